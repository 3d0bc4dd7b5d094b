"""tinygpt: train a small byte-level GPT on Python source for a fixed token budget.

nanoGPT style, top to bottom: config, model, data, optimiser, schedule, loop. Ideas edit this
file. The data (corpus, splits, token budget) live in the protected data.py and the score is
computed afterwards by the protected evaluate.py, which rebuilds the model from this file:

    model = GPT(GPTConfig(**checkpoint["config"])); model.load_state_dict(checkpoint["model"])
    logits = model(idx)  # (B, T, vocab) for every position, or a tuple whose first item is that

so GPT / GPTConfig must stay importable (training runs only under `__main__`) and the model
must be causal: evaluate.py rejects the run if logits at position t depend on tokens after t.
It also rejects a run whose import replaces functions of torch, torch.nn.functional or data
(monkeypatching): change behaviour inside this file's own classes and functions instead.

Run: python train.py [--smoke]. Reads GROUNDLOOP_SEED (default 0), GROUNDLOOP_DEVICE (cpu or
cuda) and GROUNDLOOP_SMOKE=1. Writes out/ckpt.pt.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import data
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config
N_LAYER = 4
N_HEAD = 4
N_EMBD = 128
BLOCK_SIZE = 128  # context length in bytes
DROPOUT = 0.0
BIAS = False
BATCH_SIZE = 16
LEARNING_RATE = 2e-3  # peak
MIN_LR_RATIO = 0.1  # final learning rate = MIN_LR_RATIO * LEARNING_RATE
WARMUP_STEPS = 20
LR_SCHEDULE = "cosine"  # cosine | linear | constant (after warmup)
WEIGHT_DECAY = 0.1
BETA1 = 0.9
BETA2 = 0.95
GRAD_CLIP = 1.0  # 0 disables clipping
LOG_EVERY = 25
# One thread, fixed, so a seed gives the same numbers; a second thread gains little at this
# size and loses badly when the cores are shared (OpenMP threads spin-wait for each other).
THREADS = 1


# ----------------------------------------------------------------------------- model
@dataclass
class GPTConfig:
    block_size: int = BLOCK_SIZE
    vocab_size: int = data.VOCAB_SIZE
    n_layer: int = N_LAYER
    n_head: int = N_HEAD
    n_embd: int = N_EMBD
    dropout: float = DROPOUT
    bias: bool = BIAS


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "N_EMBD must be a multiple of N_HEAD"
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by depth so the residual stream stays O(1).
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        assert T <= self.config.block_size, f"sequence of {T} > block_size {self.config.block_size}"
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


# ----------------------------------------------------------------------------- optimiser
def configure_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # Decay matrices only; biases, norms and embeddings-as-vectors are left alone.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(BETA1, BETA2))


# ----------------------------------------------------------------------------- schedule
def learning_rate(step: int, total_steps: int) -> float:
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    min_lr = LEARNING_RATE * MIN_LR_RATIO
    progress = (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
    if LR_SCHEDULE == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (LEARNING_RATE - min_lr)
    if LR_SCHEDULE == "linear":
        return LEARNING_RATE - progress * (LEARNING_RATE - min_lr)
    if LR_SCHEDULE == "constant":
        return LEARNING_RATE
    raise ValueError(f"LR_SCHEDULE={LR_SCHEDULE!r}; use cosine, linear or constant")


# ----------------------------------------------------------------------------- loop
def main() -> None:
    smoke = "--smoke" in sys.argv or data.smoke_mode()
    seed = int(os.environ.get("GROUNDLOOP_SEED", "0"))
    device = os.environ.get("GROUNDLOOP_DEVICE", "cpu")
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    if device == "cpu":
        torch.set_num_threads(THREADS)

    config = GPTConfig()
    model = GPT(config).to(device)
    optimizer = configure_optimizer(model)
    total_steps = data.steps_in_budget(BATCH_SIZE, BLOCK_SIZE, smoke)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"seed {seed} device {device} params {n_params:,} steps {total_steps} "
        f"tokens/step {BATCH_SIZE * BLOCK_SIZE}",
        flush=True,
    )

    model.train()
    started = time.perf_counter()
    step = 0
    for step, (x, y) in enumerate(data.train_batches(BATCH_SIZE, BLOCK_SIZE, seed, device, smoke)):
        lr = learning_rate(step, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if GRAD_CLIP > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        if step % LOG_EVERY == 0 or step == total_steps - 1:
            elapsed = time.perf_counter() - started
            print(
                f"step {step:5d}/{total_steps} loss {loss.item():.4f} lr {lr:.2e} "
                f"{elapsed:6.1f}s {data.tokens_served() / max(elapsed, 1e-9):,.0f} tok/s",
                flush=True,
            )

    out = Path("out")
    out.mkdir(exist_ok=True)
    torch.save({"model": model.state_dict(), "config": asdict(config)}, out / "ckpt.pt")
    print(
        f"trained {step + 1} steps, {data.tokens_served():,} tokens in "
        f"{time.perf_counter() - started:.1f}s; saved {out / 'ckpt.pt'}",
        flush=True,
    )


if __name__ == "__main__":
    main()
