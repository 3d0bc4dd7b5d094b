"""tinygrpo task (protected): addition problems, their fixed splits, the tokenizer and the verifier.

A problem is a pair (a, b) with 10 <= a, b <= 999. The prompt is zero-padded to a fixed width,
"045+123=", and the answer is the sum's digits, least significant first, then the end mark: "861."
(045 + 123 = 168). Every pair
belongs to exactly one split, chosen by a fixed hash of the pair: val (search), test (final
reports only) or train (what prepare.py and train.py may sample from), so the three never
overlap.

Consumes nothing; emits token tensors, problem lists and rewards. No randomness outside the
generators callers pass in.
"""

from __future__ import annotations

import random

import torch

LOW, HIGH = 10, 999
DIGITS = 3
EOS = "."
PAD = "_"
VOCAB = "0123456789+=" + EOS + PAD
STOI = {ch: i for i, ch in enumerate(VOCAB)}
EOS_ID, PAD_ID = STOI[EOS], STOI[PAD]
PROMPT_LEN = 2 * DIGITS + 2  # "045+123="
MAX_ANSWER_TOKENS = 5  # up to 4 digits (999 + 999 = 1998) and the end mark
EVAL_PROBLEMS = 1000
SMOKE_EVAL_PROBLEMS = 64
SPLIT_SEEDS = {"val": 101, "test": 202}

Problem = tuple[int, int]


def split_of(a: int, b: int) -> str:
    """The split a pair belongs to: a fixed multiplicative hash, 10 % val, 10 % test."""
    # The high bits of Knuth's hash mix well; its low bits would follow the parity of a + b.
    bucket = (((a * 1009 + b) * 2654435761 % 2**32) >> 16) % 10
    return "val" if bucket == 0 else "test" if bucket == 1 else "train"


def prompt_text(problem: Problem) -> str:
    a, b = problem
    return f"{a:0{DIGITS}d}+{b:0{DIGITS}d}="


def answer_text(problem: Problem) -> str:
    # Least significant digit first: each digit then depends only on digits already seen and
    # the carry, which a tiny transformer can learn (most significant first is much harder).
    return f"{problem[0] + problem[1]}"[::-1] + EOS


def encode(text: str) -> list[int]:
    return [STOI[ch] for ch in text]


def decode(ids: list[int] | torch.Tensor) -> str:
    return "".join(VOCAB[i] for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids))


def completion_text(ids: list[int] | torch.Tensor) -> str:
    """Decoded completion up to and including the first end mark (padding dropped)."""
    text = decode(ids).replace(PAD, "")
    cut = text.find(EOS)
    return text if cut < 0 else text[: cut + 1]


def reward(problem: Problem, completion_ids: list[int] | torch.Tensor) -> float:
    """1.0 when the completion is exactly the sum followed by the end mark, else 0.0."""
    return 1.0 if completion_text(completion_ids) == answer_text(problem) else 0.0


def encode_prompts(problems: list[Problem]) -> torch.Tensor:
    """(N, PROMPT_LEN) int64 prompt ids; every prompt has the same length."""
    return torch.tensor([encode(prompt_text(p)) for p in problems], dtype=torch.long)


def eval_problems(split: str, smoke: bool = False) -> list[Problem]:
    """The fixed evaluation problems of `split` ("val" or "test")."""
    if split not in SPLIT_SEEDS:
        raise ValueError(
            f"unknown evaluation split {split!r}; use val (search) or test (final reports)"
        )
    pool = [
        (a, b)
        for a in range(LOW, HIGH + 1)
        for b in range(LOW, HIGH + 1)
        if split_of(a, b) == split
    ]
    problems = random.Random(SPLIT_SEEDS[split]).sample(pool, EVAL_PROBLEMS)
    return problems[:SMOKE_EVAL_PROBLEMS] if smoke else problems


def sample_train_problems(count: int, generator: torch.Generator) -> list[Problem]:
    """`count` random training pairs (never val or test), drawn with `generator`."""
    problems: list[Problem] = []
    while len(problems) < count:
        pairs = torch.randint(LOW, HIGH + 1, (2 * count, 2), generator=generator).tolist()
        problems += [(a, b) for a, b in pairs if split_of(a, b) == "train"]
    return problems[:count]
