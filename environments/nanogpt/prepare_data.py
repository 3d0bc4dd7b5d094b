"""Download the FineWeb GPT-2 token shards nanogpt trains and evaluates on (run once, by hand).

The shards are the modded-nanogpt speedrun's: `fineweb_val_000000.bin` (100M tokens; its first
10.5M are the val split, the next 10.5M the test split) and `fineweb_train_000001.bin` …
`fineweb_train_000103.bin` (100M tokens each), from the Hugging Face dataset
kjj0/fineweb10B-gpt2. Each is checked (header magic, version, size) after download.

    python prepare_data.py --out ~/.groundloop/cache/nanogpt/fineweb10B            # all 103 shards (~20 GB)
    python prepare_data.py --out DIR --train-shards 10                            # enough for 1 GPU
    python prepare_data.py --out DIR --base-url https://mirror.example/fineweb10B/ # any mirror
    python prepare_data.py --out DIR --check                                       # verify only

Uses huggingface_hub when installed (resumable, honours HF_ENDPOINT / HF_TOKEN), plain HTTPS
otherwise. Never run by tests or by the runner.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import data

REPO_ID = "kjj0/fineweb10B-gpt2"
DEFAULT_BASE_URL = f"https://huggingface.co/datasets/{REPO_ID}/resolve/main/"
ALL_TRAIN_SHARDS = 103
# 25 min on 8 H100s at the baseline's speed reads about 7B tokens; all shards leave headroom.
DEFAULT_TRAIN_SHARDS = ALL_TRAIN_SHARDS


def shard_names(train_shards: int) -> list[str]:
    return ["fineweb_val_000000.bin"] + [
        f"fineweb_train_{i:06d}.bin" for i in range(1, train_shards + 1)
    ]


def download(name: str, out: Path, base_url: str | None) -> None:
    target = out / name
    if base_url is None:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            base_url = DEFAULT_BASE_URL
        else:
            hf_hub_download(repo_id=REPO_ID, filename=name, repo_type="dataset", local_dir=out)
            return
    partial = target.with_suffix(".partial")
    with (
        urllib.request.urlopen(base_url.rstrip("/") + "/" + name, timeout=60) as response,
        open(partial, "wb") as sink,
    ):
        shutil.copyfileobj(response, sink, length=1 << 22)
    partial.replace(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cache = os.environ.get("GROUNDLOOP_CACHE_DIR")
    default_out = (
        Path(cache) / data.DATA_SUBDIR
        if cache
        else Path.home() / ".groundloop" / "cache" / "nanogpt" / data.DATA_SUBDIR
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=default_out,
        help=f"folder for the shards (default {default_out})",
    )
    parser.add_argument(
        "--train-shards",
        type=int,
        default=DEFAULT_TRAIN_SHARDS,
        help=f"how many of the {ALL_TRAIN_SHARDS} train shards (100M tokens each)",
    )
    parser.add_argument(
        "--base-url",
        default=None,
        help="download from this URL prefix instead of the Hugging Face Hub",
    )
    parser.add_argument("--check", action="store_true", help="only verify what is there")
    args = parser.parse_args(argv)
    if not 1 <= args.train_shards <= ALL_TRAIN_SHARDS:
        parser.error(f"--train-shards must be between 1 and {ALL_TRAIN_SHARDS}")
    args.out.mkdir(parents=True, exist_ok=True)
    problems = []
    for name in shard_names(args.train_shards):
        path = args.out / name
        try:
            if not path.is_file():
                if args.check:
                    raise FileNotFoundError(f"{path} is missing")
                print(f"downloading {name} …", flush=True)
                download(name, args.out, args.base_url)
            tokens = data.shard_size(path)
            print(f"ok {name}: {tokens:,} tokens", flush=True)
        except (OSError, ValueError) as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        print("problems:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(
        f"done: shards in {args.out}. Runs find them via NANOGPT_DATA_DIR={args.out} or the "
        f"runner's cache dir for nanogpt (<cache>/{data.DATA_SUBDIR})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
