"""GPT-2 (124M) pre-training on FineWeb: the baseline recipe that ideas edit (nanoGPT style).

Reads top to bottom: hyperparameters, model, data, optimiser and schedule, training loop.
It is the paper's nanoGPT baseline: pre-norm RMSNorm blocks without biases, GELU MLP, tied
embeddings, AdamW, linear warmup then linear decay, bf16 autocast and torch.compile on GPUs.

Launch (the manifest's entrypoint uses every visible GPU; 8 in the paper's setting):
    python -m torch.distributed.run --standalone --nproc_per_node=gpu train.py
    python train.py                       # one GPU (or CPU), same global batch via accumulation
    GROUNDLOOP_SMOKE=1 python train.py    # toy model on random tokens, CPU, seconds

Contract with the protected files (keep it when editing):
- `build_model(model_config: dict) -> nn.Module`, and calling the model on int64 tokens of
  shape (B, T) returns logits (B, T, vocab >= 50257); it must accept T = 1024 and be causal
  (evaluate.py probes that outputs at position t ignore every token after t);
- training stops when `harness.TrainingClock.should_stop` says so (25 minutes of training)
  and ends with `harness.save_checkpoint(...)`;
- importing this file must not start training, change settings or touch the evaluation.
Reads GROUNDLOOP_SEED, GROUNDLOOP_DEVICE ("cuda"/"cpu"), GROUNDLOOP_SMOKE; torchrun's RANK,
LOCAL_RANK, WORLD_SIZE. Writes out/model.pt (via the harness) and a log on stdout.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import harness

# ----------------------------------------------------------------------------- hyperparameters
LEARNING_RATE = 0.0015
WARMUP_ITERS = 256  # linear warmup steps
NUM_ITERATIONS = 26880  # the schedule's horizon (the time budget usually ends training first)
WARMDOWN_ITERS = 26624  # linear decay over the last WARMDOWN_ITERS steps of the horizon
MIN_LR_FRAC = 0.0909  # learning rate at the end of the decay, as a fraction of the peak
WEIGHT_DECAY = 0.1
BETA1 = 0.9
BETA2 = 0.95
GRAD_CLIP = 1.0
BATCH_SIZE = 32  # sequences per GPU per micro-step
SEQUENCE_LENGTH = 1024
TOTAL_BATCH_TOKENS = 262144  # tokens per optimiser step over all GPUs (gradient accumulation)
N_LAYER = 12
N_HEAD = 12
N_EMBD = 768
VOCAB_SIZE = 50304  # GPT-2's 50257 padded to a multiple of 64 (faster matmuls)
COMPILE = True  # torch.compile on CUDA
LOG_EVERY = 10

# Smoke mode: a toy model on random tokens, a few steps on CPU.
SMOKE_MODEL = dict(
    vocab_size=data.SMOKE_VOCAB_SIZE, block_size=data.SMOKE_SEQ_LEN, n_layer=2, n_head=2, n_embd=64
)
SMOKE_BATCH_SIZE = 8


# --------------------------------------------------------------------------------------- model
def rmsnorm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.residual_scale = 1.0 / math.sqrt(2 * n_layer)  # keeps the residual stream's scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y) * self.residual_scale


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(n_embd, n_head, n_layer)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(rmsnorm(x))
        return x + self.mlp(rmsnorm(x))


class GPT(nn.Module):
    def __init__(
        self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, n_layer) for _ in range(n_layer))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        nn.init.normal_(self.wpe.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        self.wte.weight = self.lm_head.weight  # tied input and output embeddings

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        assert T <= self.block_size, f"sequence of {T} tokens exceeds block_size {self.block_size}"
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(rmsnorm(x))


def build_model(model_config: dict) -> nn.Module:
    return GPT(**model_config)


# ---------------------------------------------------------------------------------------- data
class TokenBatches:
    """(B, T) inputs and next-token targets from the training stream; rank r of w reads every
    w-th window, so ranks never see the same tokens."""

    def __init__(
        self, batch_size: int, seq_len: int, rank: int, world: int, device: torch.device, seed: int
    ) -> None:
        self.arrays = data.train_token_arrays(seed)
        self.tokens = next(self.arrays)
        self.batch_size, self.seq_len, self.rank, self.world = batch_size, seq_len, rank, world
        self.device = device
        self.position = rank * batch_size * seq_len

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.batch_size * self.seq_len
        if self.position + span + 1 > len(self.tokens):
            self.tokens, self.position = next(self.arrays), self.rank * span
        window = torch.from_numpy(
            self.tokens[self.position : self.position + span + 1].astype(np.int64)
        )
        self.position += span * self.world
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        return window[:-1].view(self.batch_size, -1), window[1:].view(self.batch_size, -1)


# ----------------------------------------------------------------------- optimiser and schedule
def configure_optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(),
        lr=LEARNING_RATE,
        betas=(BETA1, BETA2),
        weight_decay=WEIGHT_DECAY,
        fused=device.type == "cuda",
    )


def learning_rate(step: int) -> float:
    if step < WARMUP_ITERS:
        return LEARNING_RATE * (step + 1) / WARMUP_ITERS
    decay_start = NUM_ITERATIONS - WARMDOWN_ITERS
    if step < decay_start:
        return LEARNING_RATE
    progress = min(1.0, (step - decay_start) / max(1, WARMDOWN_ITERS))
    return LEARNING_RATE * (1.0 - (1.0 - MIN_LR_FRAC) * progress)


# ------------------------------------------------------------------------------ training loop
def setup_distributed() -> tuple[int, int, torch.device]:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = os.environ.get("GROUNDLOOP_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "GROUNDLOOP_DEVICE=cuda but torch sees no GPU; install a CUDA build "
            "of torch or run the smoke mode on CPU (GROUNDLOOP_SMOKE=1)"
        )
    device = torch.device(f"cuda:{local_rank}" if wanted == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def main() -> None:
    smoke = data.smoke_mode()
    seed = int(os.environ.get("GROUNDLOOP_SEED", "0"))
    rank, world, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(seed)  # identical initial weights on every rank
    if smoke:
        model_config, batch_size = dict(SMOKE_MODEL), SMOKE_BATCH_SIZE
    else:
        model_config = dict(
            vocab_size=VOCAB_SIZE,
            block_size=SEQUENCE_LENGTH,
            n_layer=N_LAYER,
            n_head=N_HEAD,
            n_embd=N_EMBD,
        )
        batch_size = BATCH_SIZE
    seq_len = model_config["block_size"]
    raw_model = build_model(model_config).to(device)
    model = (
        torch.compile(raw_model) if COMPILE and device.type == "cuda" and not smoke else raw_model
    )
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = configure_optimizer(raw_model, device)
    tokens_per_micro_step = batch_size * seq_len * world
    grad_accum = 1 if smoke else max(1, TOTAL_BATCH_TOKENS // tokens_per_micro_step)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    batches = TokenBatches(batch_size, seq_len, rank, world, device, seed)
    clock = harness.TrainingClock(device)
    if master:
        params = sum(p.numel() for p in raw_model.parameters())
        print(
            f"model {params / 1e6:.1f}M params, {world} process(es) on {device.type}, "
            f"{grad_accum * tokens_per_micro_step:,} tokens/step ({grad_accum} micro-steps), "
            f"{clock.describe()}",
            flush=True,
        )

    step, tokens, last_log, last_log_tokens = 0, 0, time.monotonic(), 0
    while not clock.should_stop(step, raw_model):
        lr = learning_rate(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro_step in range(grad_accum):
            x, y = batches.next()
            if world > 1:  # average gradients across ranks only on the last micro-step
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with autocast:
                logits = model(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            (loss / grad_accum).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += grad_accum * tokens_per_micro_step
        if master and (step % LOG_EVERY == 0 or step == 1 or smoke):
            loss_value = loss.item()  # synchronises, so the interval timing below is honest
            now = time.monotonic()
            rate = (tokens - last_log_tokens) / max(now - last_log, 1e-9)
            print(
                f"step {step} | loss {loss_value:.4f} | lr {lr:.2e} | grad norm "
                f"{grad_norm.item():.3f} | {rate:,.0f} tokens/s | "
                f"{clock.training_seconds():.1f} s",
                flush=True,
            )
            last_log, last_log_tokens = now, tokens
    harness.save_checkpoint(raw_model, model_config, step=step, tokens=tokens, clock=clock)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
