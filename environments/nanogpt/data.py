"""nanogpt data (protected): FineWeb GPT-2 token shards, the fixed val/test token sets, smoke tokens.

Consumes: the shards `prepare_data.py` downloads (modded-nanogpt format: a header of 256 int32 —
magic 20240520, version 1, token count — then the tokens as uint16) from the first of
  $NANOGPT_DATA_DIR, $GROUNDLOOP_CACHE_DIR/fineweb10B, ~/.groundloop/cache/nanogpt/fineweb10B.
Emits: training shards as numpy memmaps (cycled forever) and the int64 token stream the
protected evaluation scores.

Splits: `val` (what a search selects on) is the speedrun's validation set, the first
EVAL_TOKENS (+1 for the last target) of fineweb_val_000000.bin; `test` (final reports only)
is the next EVAL_TOKENS of the same file, never seen during search. Training reads only
fineweb_train_*.bin. The evaluation runs model code in a worker that cannot read the val
shards (`unreadable_paths`, Landlock).

Smoke mode (GROUNDLOOP_SMOKE=1) never touches the disk: uniform random tokens over a
SMOKE_VOCAB_SIZE vocabulary, so a CPU pre-flight runs in seconds on any machine. Synthetic
mode (NANOGPT_SYNTHETIC_DATA=1, for throughput benchmarks on a box without the shards):
uniform random GPT-2 token ids at full size; its losses (about ln 50257 = 10.8) mean nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
VOCAB_SIZE = 50257  # GPT-2 BPE; token ids in the shards are < VOCAB_SIZE
EVAL_SEQ_LEN = 1024  # the evaluation scores sequences of this length, whatever training used
EVAL_TOKENS = 10_485_760  # the speedrun's validation-set size
DATA_SUBDIR = "fineweb10B"

SMOKE_VOCAB_SIZE = 256
SMOKE_SEQ_LEN = 64
SMOKE_EVAL_TOKENS = 32 * SMOKE_SEQ_LEN
SMOKE_TRAIN_TOKENS = 1 << 16
SYNTHETIC_TRAIN_TOKENS = 1 << 24
_EVAL_SEEDS = {"val": 1_000_003, "test": 2_000_003}  # random (smoke / synthetic) eval streams


def smoke_mode() -> bool:
    return os.environ.get("GROUNDLOOP_SMOKE") == "1"


def synthetic_mode() -> bool:
    return os.environ.get("NANOGPT_SYNTHETIC_DATA") == "1" and not smoke_mode()


def eval_seq_len() -> int:
    return SMOKE_SEQ_LEN if smoke_mode() else EVAL_SEQ_LEN


def vocab_size() -> int:
    """Token ids the data can contain (the model's vocabulary may be padded above this)."""
    return SMOKE_VOCAB_SIZE if smoke_mode() else VOCAB_SIZE


def candidate_dirs() -> list[Path]:
    found = []
    if os.environ.get("NANOGPT_DATA_DIR"):
        found.append(Path(os.environ["NANOGPT_DATA_DIR"]))
    if os.environ.get("GROUNDLOOP_CACHE_DIR"):
        found.append(Path(os.environ["GROUNDLOOP_CACHE_DIR"]) / DATA_SUBDIR)
    found.append(Path.home() / ".groundloop" / "cache" / "nanogpt" / DATA_SUBDIR)
    return found


def data_dir() -> Path:
    """The folder holding the shards; the error says where it looked and how to fix it."""
    for folder in candidate_dirs():
        if list(folder.glob("fineweb_val_*.bin")) and list(folder.glob("fineweb_train_*.bin")):
            return folder
    looked = ", ".join(str(p) for p in candidate_dirs())
    raise FileNotFoundError(
        f"no FineWeb shards found (looked in: {looked}). Download them once with "
        "`python environments/nanogpt/prepare_data.py --out <dir>` and point NANOGPT_DATA_DIR "
        f"at <dir>, or put them in <runner cache dir for nanogpt>/{DATA_SUBDIR}. "
        "For a CPU check without data, set GROUNDLOOP_SMOKE=1."
    )


def shard_size(path: Path) -> int:
    """Validate a shard's header and return its token count."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < HEADER_INTS or header[0] != MAGIC:
        raise ValueError(
            f"{path}: not a token shard (magic {header[:1]} != {MAGIC}); "
            "re-download it with prepare_data.py"
        )
    if header[1] != VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    count = int(header[2])
    expected_bytes = HEADER_INTS * 4 + 2 * count
    if path.stat().st_size != expected_bytes:
        raise ValueError(
            f"{path}: {path.stat().st_size} bytes but the header promises "
            f"{expected_bytes}; the file is truncated — re-download it"
        )
    return count


def read_shard(path: Path) -> np.ndarray:
    """The shard's tokens as a read-only uint16 memmap (no copy into RAM)."""
    count = shard_size(path)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(count,))


def unreadable_paths() -> list[Path]:
    """The val/test shards wherever a run might find them: the evaluation's model worker
    (which runs editable code) gets a Landlock ruleset denying these files, so it sees the
    split only one batch at a time. Never raises: no shards, nothing to deny."""
    return sorted({p.resolve() for d in candidate_dirs() for p in d.glob("fineweb_val_*.bin")})


def train_shard_paths() -> list[Path]:
    return sorted(data_dir().glob("fineweb_train_*.bin"))


def train_token_arrays(seed: int = 0) -> Iterator[np.ndarray]:
    """Training shards in order, cycled forever (a second pass repeats data, as it would on
    any fixed corpus). Smoke: one random array drawn from `seed`."""
    if smoke_mode() or synthetic_mode():
        count = SMOKE_TRAIN_TOKENS if smoke_mode() else SYNTHETIC_TRAIN_TOKENS
        tokens = np.random.default_rng(seed).integers(0, vocab_size(), count, dtype=np.uint16)
        while True:
            yield tokens
    paths = train_shard_paths()
    while True:
        for path in paths:
            yield read_shard(path)


def eval_tokens(split: str) -> torch.Tensor:
    """The fixed int64 token stream the evaluation scores: N * seq_len inputs plus one target."""
    if split not in ("val", "test"):
        raise ValueError(f"unknown split {split!r}; nanogpt has `val` (search) and `test` (final)")
    if smoke_mode() or synthetic_mode():
        count = SMOKE_EVAL_TOKENS if smoke_mode() else EVAL_TOKENS
        generator = torch.Generator().manual_seed(_EVAL_SEEDS[split])
        return torch.randint(0, vocab_size(), (count + 1,), generator=generator)
    val_paths = sorted(data_dir().glob("fineweb_val_*.bin"))
    tokens = read_shard(val_paths[0])
    start = 0 if split == "val" else EVAL_TOKENS
    if len(tokens) < start + EVAL_TOKENS + 1:
        raise ValueError(
            f"{val_paths[0]} holds {len(tokens)} tokens; the {split} split needs "
            f"{start + EVAL_TOKENS + 1}. Re-download fineweb_val_000000.bin"
        )
    return torch.from_numpy(tokens[start : start + EVAL_TOKENS + 1].astype(np.int64))
