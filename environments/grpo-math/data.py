"""grpo-math data and base model (protected): MATH splits, the prompt, the policy to start from.

Consumes what `prepare_data.py` wrote under the cache root (the first of $GRPO_MATH_DIR,
$GROUNDLOOP_CACHE_DIR, ~/.groundloop/cache/grpo-math):
  Qwen2.5-Math-1.5B/          the base model (config, safetensors, tokenizer)
  MATH/train.jsonl            MATH train minus the validation split (training only)
  MATH/val.jsonl              VAL_PROBLEMS problems held out from MATH train (search selects here)
  MATH/test.jsonl             MATH-500 (final reports only)
each line {"problem": ..., "answer": ..., ...}.
Emits problems, prompts (the r1_zero template the protected evaluation uses), the tokenizer and
the base policy.

Smoke mode (GROUNDLOOP_SMOKE=1) downloads nothing: synthetic arithmetic problems, a byte-level
tokenizer built here, and a tiny randomly-initialised Qwen2 model built from a config with a
fixed seed (the same "base model" for every run).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

MODEL_SUBDIR = "Qwen2.5-Math-1.5B"
MATH_SUBDIR = "MATH"
VAL_PROBLEMS = 500
SPLITS = ("train", "val", "test")

PROMPT_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant "
    "solves it. The Assistant first thinks about the reasoning process in the mind and then "
    "provides the User with the answer. The reasoning process is enclosed within <think> "
    "</think> and answer is enclosed within <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>.\n"
    "User: {question}\nAssistant: <think>"
)

SMOKE_PROBLEMS = {"train": 32, "val": 8, "test": 8}
_SMOKE_SPLIT_SEEDS = {"train": 11, "val": 23, "test": 37}
SMOKE_BASE_SEED = 1234
SMOKE_MODEL_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def smoke_mode() -> bool:
    return os.environ.get("GROUNDLOOP_SMOKE") == "1"


def format_prompt(problem: str) -> str:
    return PROMPT_TEMPLATE.format(question=problem)


def candidate_roots() -> list[Path]:
    roots = [
        Path(os.environ[name])
        for name in ("GRPO_MATH_DIR", "GROUNDLOOP_CACHE_DIR")
        if os.environ.get(name)
    ]
    return roots + [Path.home() / ".groundloop" / "cache" / "grpo-math"]


def cache_root() -> Path:
    for root in candidate_roots():
        if (root / MODEL_SUBDIR / "config.json").is_file() and (
            root / MATH_SUBDIR / "val.jsonl"
        ).is_file():
            return root
    looked = ", ".join(str(p) for p in candidate_roots())
    raise FileNotFoundError(
        f"no prepared model and MATH data found (looked in: {looked}). Run once, with internet: "
        "`python environments/grpo-math/prepare_data.py --out <dir>` and set GRPO_MATH_DIR=<dir> "
        "(or use the runner's cache dir for grpo-math as <dir>). For a CPU check without "
        "downloads, set GROUNDLOOP_SMOKE=1."
    )


def model_dir() -> Path:
    return cache_root() / MODEL_SUBDIR


def _smoke_problems(split: str) -> list[dict[str, str]]:
    rng = random.Random(_SMOKE_SPLIT_SEEDS[split])
    problems = []
    for _ in range(SMOKE_PROBLEMS[split]):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        problems.append({"problem": f"What is ${a} {op} {b}$?", "answer": str(value)})
    return problems


def load_problems(split: str) -> list[dict[str, str]]:
    if split not in SPLITS:
        raise ValueError(
            f"unknown split {split!r}; grpo-math has {SPLITS} (test = MATH-500, final reports only)"
        )
    if smoke_mode():
        return _smoke_problems(split)
    path = cache_root() / MATH_SUBDIR / f"{split}.jsonl"
    with open(path) as lines:
        problems = [json.loads(line) for line in lines if line.strip()]
    if not problems or any("problem" not in p or "answer" not in p for p in problems):
        raise ValueError(f"{path}: every line needs 'problem' and 'answer'; re-run prepare_data.py")
    return problems


class ByteTokenizer:
    """A tokenizer built in code for smoke runs: one id per UTF-8 byte, plus pad and eos."""

    pad_token_id = 256
    eos_token_id = 257
    vocab_size = 258
    name_or_path = "byte-level (smoke)"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def quiet_transformers() -> None:
    """No progress bars in run logs (they fill the log tail a failed run reports)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def load_tokenizer():
    """The base model's tokenizer (the evaluation never uses one a run saved)."""
    if smoke_mode():
        return ByteTokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def load_base_model(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The policy every run starts from: Qwen2.5-Math-1.5B, or the smoke mode's tiny Qwen2."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    quiet_transformers()
    if smoke_mode():
        tokenizer = ByteTokenizer()
        config = Qwen2Config(
            vocab_size=tokenizer.vocab_size,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **SMOKE_MODEL_CONFIG,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SMOKE_BASE_SEED)
            model = Qwen2ForCausalLM(config)
        return model.to(device=device, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(model_dir(), dtype=dtype).to(device)
