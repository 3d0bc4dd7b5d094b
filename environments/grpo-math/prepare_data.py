"""Download Qwen2.5-Math-1.5B and MATH, and write grpo-math's splits (run once, by hand).

Writes under --out (default $GROUNDLOOP_CACHE_DIR or ~/.groundloop/cache/grpo-math):
  Qwen2.5-Math-1.5B/   the base model (huggingface_hub.snapshot_download)
  MATH/train.jsonl     MATH train (7,500 problems) minus the validation split
  MATH/val.jsonl       VAL_PROBLEMS train problems chosen by a hash of the problem text
  MATH/test.jsonl      MATH-500 (final reports only)
  MATH/splits.json     counts and sha256 of each file
Each line is {"problem", "answer", "solution", "level", "subject"}; MATH train answers are the
last \\boxed{} of the reference solution. The validation split is held out from *train*, so
searches never select on MATH-500 (or on any MATH test problem).

    pip install huggingface_hub datasets
    python prepare_data.py --out /data/grpo-math
    python prepare_data.py --out DIR --math-train-jsonl my_math_train.jsonl --math500-jsonl math500.jsonl

Never run by tests or by the runner.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import data
import grader

MODEL_REPO = "Qwen/Qwen2.5-Math-1.5B"
MATH_TRAIN_DATASET = "DigitalLearningGmbH/MATH-lighteval"  # the 12,500 MATH problems, train/test
MATH500_DATASET = "HuggingFaceH4/MATH-500"


def download_model(out: Path) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SystemExit("pip install huggingface_hub (needed to download the model)") from None
    snapshot_download(
        MODEL_REPO,
        local_dir=out / data.MODEL_SUBDIR,
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"],
    )


def _rows_from_hub(dataset: str, split: str) -> list[dict]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit(
            "pip install datasets (or pass --math-train-jsonl / --math500-jsonl)"
        ) from None
    return [dict(row) for row in load_dataset(dataset, split=split)]


def _rows_from_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def to_problem(row: dict) -> dict | None:
    answer = row.get("answer") or grader.last_boxed(row.get("solution", ""))
    if not row.get("problem") or not answer:
        return None
    return {
        "problem": row["problem"],
        "answer": answer,
        "solution": row.get("solution", ""),
        "level": row.get("level", ""),
        "subject": row.get("subject") or row.get("type", ""),
    }


def split_train(problems: list[dict], val_count: int) -> tuple[list[dict], list[dict]]:
    """Deterministic held-out split: the val_count problems with the smallest text hashes."""
    ranked = sorted(problems, key=lambda p: hashlib.sha256(p["problem"].encode()).hexdigest())
    return ranked[val_count:], ranked[:val_count]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    default_out = Path(
        os.environ.get("GROUNDLOOP_CACHE_DIR")
        or Path.home() / ".groundloop" / "cache" / "grpo-math"
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--skip-model", action="store_true", help="only (re)build the MATH splits")
    parser.add_argument(
        "--math-train-jsonl", type=Path, help="local MATH train rows instead of the Hub"
    )
    parser.add_argument("--math500-jsonl", type=Path, help="local MATH-500 rows instead of the Hub")
    parser.add_argument("--val-problems", type=int, default=data.VAL_PROBLEMS)
    args = parser.parse_args(argv)
    if not args.skip_model:
        print(f"downloading {MODEL_REPO} …", flush=True)
        download_model(args.out)
    train_rows = (
        _rows_from_jsonl(args.math_train_jsonl)
        if args.math_train_jsonl
        else _rows_from_hub(MATH_TRAIN_DATASET, "train")
    )
    test_rows = (
        _rows_from_jsonl(args.math500_jsonl)
        if args.math500_jsonl
        else _rows_from_hub(MATH500_DATASET, "test")
    )
    test = [p for p in map(to_problem, test_rows) if p]
    test_texts = {p["problem"].strip() for p in test}
    # MATH-500 comes from MATH test, so this should drop nothing; it guards other sources.
    pool = [p for p in map(to_problem, train_rows) if p and p["problem"].strip() not in test_texts]
    train, val = split_train(pool, args.val_problems)
    folder = args.out / data.MATH_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    digests = {
        name: write_jsonl(folder / f"{name}.jsonl", rows)
        for name, rows in (("train", train), ("val", val), ("test", test))
    }
    summary = {
        "train": len(train),
        "val": len(val),
        "test": len(test),
        "sha256": digests,
        "sources": {
            "train": str(args.math_train_jsonl or MATH_TRAIN_DATASET),
            "test": str(args.math500_jsonl or MATH500_DATASET),
        },
    }
    (folder / "splits.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"done. Runs find this via GRPO_MATH_DIR={args.out} or the runner's cache dir.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
