"""tinygrpo policy (protected): the tiny char-level transformer, greedy decoding, the base checkpoint.

The architecture is fixed here, not in train.py, because prepare.py builds the base policy once
per environment and evaluate.py must load whatever train.py saves into the same class. Ideas
change how the policy is trained (train.py), not what it is.

Consumes: GROUNDLOOP_CACHE_DIR (where prepare.py put the base policy). Emits: Policy, greedy
decoding, and the path of the base checkpoint, keyed by the digest of the files that build it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import task
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
# The files that determine the base policy; any change to them builds a new one.
BASE_INPUTS = ("policy.py", "task.py", "prepare.py")


@dataclass
class PolicyConfig:
    vocab_size: int = len(task.VOCAB)
    block_size: int = task.PROMPT_LEN + task.MAX_ANSWER_TOKENS
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64


class Block(nn.Module):
    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.n_head = config.n_head
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.attn_proj = nn.Linear(config.n_embd, config.n_embd)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.mlp_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x))))


class Policy(nn.Module):
    """Causal transformer over task.VOCAB; forward(ids) -> logits (B, T, vocab)."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(T, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@torch.no_grad()
def greedy_decode(
    model: Policy, prompts: torch.Tensor, max_new_tokens: int = task.MAX_ANSWER_TOKENS
) -> torch.Tensor:
    """Argmax completions (N, max_new_tokens); positions after the end mark hold PAD."""
    sequence = prompts
    done = torch.zeros(len(prompts), dtype=torch.bool, device=prompts.device)
    for _ in range(max_new_tokens):
        next_id = model(sequence)[:, -1].argmax(dim=-1)
        next_id = torch.where(done, torch.full_like(next_id, task.PAD_ID), next_id)
        done |= next_id == task.EOS_ID
        sequence = torch.cat([sequence, next_id[:, None]], dim=1)
    return sequence[:, prompts.shape[1] :]


def base_digest() -> str:
    digest = hashlib.sha256()
    for name in BASE_INPUTS:
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    return digest.hexdigest()


def cache_dir() -> Path:
    configured = os.environ.get("GROUNDLOOP_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "groundloop" / "tinygrpo"


def base_checkpoint_path() -> Path:
    return cache_dir() / f"tinygrpo-base-{base_digest()[:16]}.pt"


def load_policy(path: Path, device: str = "cpu") -> Policy:
    """A Policy with the weights and config saved at `path` ({"model": ..., "config": ...})."""
    if not path.is_file():
        hint = (
            "run the prepare step first: `python prepare.py` in this environment with the same "
            "GROUNDLOOP_CACHE_DIR"
            if path.name.startswith("tinygrpo-base")
            else "train.py must save the trained policy there"
        )
        raise FileNotFoundError(f"{path} not found; {hint}")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = Policy(PolicyConfig(**checkpoint["config"])).to(device)
    model.load_state_dict(checkpoint["model"])
    return model
