"""GRPO from scratch on Qwen2.5-Math-1.5B with MATH: the baseline recipe that ideas edit.

Reads top to bottom: hyperparameters, rollouts, the GRPO pieces (group-normalised advantages,
per-token log-probabilities, clipped objective), the training loop. The defaults are the
paper's GRPO baseline: 20 steps, 128 problems x 8 samples per step, r1_zero prompt and reward,
lr 1e-5, clipped objective (0.2), micro-batches of 4 with 16 accumulation steps.

    python train.py                       # one GPU; vLLM rollouts when installed, else HF generate
    GROUNDLOOP_SMOKE=1 python train.py    # tiny random Qwen2 + byte tokenizer on CPU, seconds

Contract with the protected files (keep it when editing): start from data.load_base_model(),
save the policy with harness.save_checkpoint(model, step, clock) (the evaluation scores every
saved checkpoint on the validation split and keeps the best; at most 4 are kept, the last slot
always holds the newest) and finish within the training clock (harness, 50 minutes).
The evaluation prompts with data.format_prompt and grades with grader.grade; the policy must
answer in "<think> ... </think> <answer> ... </answer>" form to be scored.
Reads GROUNDLOOP_SEED, GROUNDLOOP_DEVICE, GROUNDLOOP_SMOKE, GRPO_MATH_ENGINE (vllm | hf).
"""

from __future__ import annotations

import importlib.util
import os
import random
import time

import torch
import torch.nn.functional as F

import data
import grader
import harness

# ----------------------------------------------------------------------------- hyperparameters
LEARNING_RATE = 1e-5
GRPO_STEPS = 20
ROLLOUT_PROBLEMS = 128  # problems sampled per GRPO step
GROUP_SIZE = 8  # responses per problem (the group the advantages are normalised over)
SAMPLING_TEMPERATURE = 1.0
MAX_NEW_TOKENS = 1024
MIN_NEW_TOKENS = 4
EPOCHS_PER_ROLLOUT = 1  # passes over each rollout batch
MICRO_BATCH_SIZE = 4
GRADIENT_ACCUMULATION_STEPS = 16  # micro-batches per optimiser step
LOSS_TYPE = "grpo_clip"  # grpo_clip | reinforce_with_baseline | no_baseline
CLIP_RANGE = 0.2
NORMALIZE_BY_STD = True
ADVANTAGE_EPS = 1e-6
WEIGHT_DECAY = 0.0
BETA1 = 0.9
BETA2 = 0.95
GRAD_CLIP = 1.0
CHECKPOINT_EVERY = 5  # GRPO steps between saved checkpoints
HF_GENERATION_BATCH = 128  # sequences per HF generate call
VLLM_GPU_MEMORY = 0.35  # share of the GPU vLLM may take; the rest is for training
GRADIENT_CHECKPOINTING = True

SMOKE = dict(
    GRPO_STEPS=2,
    ROLLOUT_PROBLEMS=4,
    GROUP_SIZE=4,
    MAX_NEW_TOKENS=12,
    MIN_NEW_TOKENS=1,
    MICRO_BATCH_SIZE=4,
    GRADIENT_ACCUMULATION_STEPS=2,
    CHECKPOINT_EVERY=1,
    LEARNING_RATE=1e-3,
)


# ------------------------------------------------------------------------------------ rollouts
class StopAtAnswerEnd:
    """HF stopping criterion: a row is finished once "</answer>" appears in its new text."""

    def __init__(self, tokenizer, prompt_width: int) -> None:
        self.tokenizer, self.prompt_width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tails = input_ids[:, max(self.prompt_width, input_ids.shape[1] - 12) :]
        done = [
            "</answer>" in self.tokenizer.decode(row, skip_special_tokens=True) for row in tails
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_answer_end(text: str) -> str:
    end = text.find("</answer>")
    return text if end < 0 else text[: end + len("</answer>")]


@torch.no_grad()
def sample_hf(policy, tokenizer, prompts: list[str], cfg: dict, device: torch.device) -> list[str]:
    from transformers import GenerationConfig, StoppingCriteriaList

    policy.eval()
    settings = GenerationConfig(
        do_sample=True,
        temperature=SAMPLING_TEMPERATURE,
        top_p=1.0,
        top_k=0,
        max_new_tokens=cfg["MAX_NEW_TOKENS"],
        min_new_tokens=cfg["MIN_NEW_TOKENS"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = []
    for start in range(0, len(prompts), HF_GENERATION_BATCH):
        ids = [
            tokenizer.encode(p, add_special_tokens=False)
            for p in prompts[start : start + HF_GENERATION_BATCH]
        ]
        width = max(len(seq) for seq in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, seq in enumerate(ids):  # left padding, so every row continues at the same column
            input_ids[row, width - len(seq) :] = torch.tensor(seq)
            attention[row, width - len(seq) :] = 1
        output = policy.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            generation_config=settings,
            stopping_criteria=StoppingCriteriaList([StopAtAnswerEnd(tokenizer, width)]),
        )
        texts += [
            cut_at_answer_end(tokenizer.decode(row, skip_special_tokens=True))
            for row in output[:, width:]
        ]
    return texts


def start_vllm(seed: int):
    # An in-process engine, so updated weights can be pushed into it after every step.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    return LLM(
        model=str(data.model_dir()),
        dtype="bfloat16",
        seed=seed,
        gpu_memory_utilization=VLLM_GPU_MEMORY,
        enable_prefix_caching=True,
    )


def push_weights_to_vllm(llm, policy) -> None:
    """Load the policy's current weights into vLLM's copy of the model."""
    paths = (
        "llm_engine.model_executor.driver_worker.model_runner.model",  # vLLM V0 engine
        "llm_engine.model_executor.driver_worker.worker.model_runner.model",
        "llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model",
    )
    for path in paths:
        target = llm
        try:
            for name in path.split("."):
                target = getattr(target, name)
        except AttributeError:
            continue
        target.load_weights(policy.state_dict().items())
        if hasattr(llm, "reset_prefix_cache"):
            llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        return
    raise RuntimeError(
        "cannot reach the model inside this vLLM version to update its weights; "
        "set VLLM_USE_V1=0, or GRPO_MATH_ENGINE=hf to sample with HF generate"
    )


def sample_vllm(llm, prompts: list[str], cfg: dict) -> list[str]:
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=SAMPLING_TEMPERATURE,
        top_p=1.0,
        max_tokens=cfg["MAX_NEW_TOKENS"],
        min_tokens=cfg["MIN_NEW_TOKENS"],
        stop=["</answer>"],
        include_stop_str_in_output=True,
    )
    return [
        cut_at_answer_end(o.outputs[0].text) for o in llm.generate(prompts, params, use_tqdm=False)
    ]


# -------------------------------------------------------------------------------- GRPO pieces
def group_normalized_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize_by_std: bool = NORMALIZE_BY_STD,
    eps: float = ADVANTAGE_EPS,
) -> torch.Tensor:
    """Each reward minus its group's mean (divided by the group's std when asked)."""
    groups = rewards.view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if normalize_by_std:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    return advantages.flatten()


def tokenize_rollouts(
    tokenizer, prompts: list[str], responses: list[str]
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response ids; `response_mask` marks the targets that are response tokens."""
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    response_ids = [tokenizer.encode(r, add_special_tokens=False) for r in responses]
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True))
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    response_mask = torch.zeros((len(prompts), width - 1), dtype=torch.float32)
    for row, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        input_ids[row, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention[row, : len(p) + len(r)] = 1
        response_mask[row, len(p) - 1 : len(p) + len(r) - 1] = 1.0  # target t+1 predicted at t
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response_mask}


def token_log_probs(policy, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(token_{t+1} | tokens_<=t) for every position, shape (B, T-1)."""
    logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    return torch.gather(F.log_softmax(logits, dim=-1), 2, input_ids[:, 1:, None]).squeeze(-1)


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-sequence mean over response tokens of the per-token loss, averaged over the batch."""
    adv = advantages[:, None]
    if LOSS_TYPE == "grpo_clip":
        ratio = torch.exp(log_probs - old_log_probs)
        clipped = torch.clamp(ratio, 1 - CLIP_RANGE, 1 + CLIP_RANGE)
        per_token = -torch.minimum(ratio * adv, clipped * adv)
        clip_fraction = (
            (ratio * adv > clipped * adv).float() * response_mask
        ).sum() / response_mask.sum().clamp(min=1)
    elif LOSS_TYPE in ("reinforce_with_baseline", "no_baseline"):
        per_token, clip_fraction = -adv * log_probs, torch.zeros(())
    else:
        raise ValueError(
            f"LOSS_TYPE {LOSS_TYPE!r}: use grpo_clip, reinforce_with_baseline or no_baseline"
        )
    per_sequence = (per_token * response_mask).sum(-1) / response_mask.sum(-1).clamp(min=1)
    return per_sequence.mean(), {"clip_fraction": clip_fraction.item()}


# ------------------------------------------------------------------------------ training loop
def pick_device() -> torch.device:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda" if os.environ.get("GROUNDLOOP_DEVICE", default) == "cuda" else "cpu")


def grpo_update(
    policy, optimizer, rollouts: dict, advantages: torch.Tensor, cfg: dict, device: torch.device
) -> dict[str, float]:
    """EPOCHS_PER_ROLLOUT passes of micro-batched, gradient-accumulated policy updates."""
    micro = cfg["MICRO_BATCH_SIZE"]
    slices = [slice(i, i + micro) for i in range(0, len(advantages), micro)]

    def batch_log_probs(s: slice) -> torch.Tensor:
        return token_log_probs(
            policy, rollouts["input_ids"][s].to(device), rollouts["attention_mask"][s].to(device)
        )

    with torch.no_grad():  # the sampling policy's log-probs, for the clipped ratio
        policy.eval()
        old_log_probs = [batch_log_probs(s) for s in slices]
    policy.train()
    losses, clip_fractions = [], []
    for _ in range(EPOCHS_PER_ROLLOUT):
        for index, s in enumerate(slices):
            loss, stats = policy_loss(
                batch_log_probs(s),
                old_log_probs[index],
                advantages[s].to(device),
                rollouts["response_mask"][s].to(device),
            )
            (loss / cfg["GRADIENT_ACCUMULATION_STEPS"]).backward()
            losses.append(loss.item())
            clip_fractions.append(stats["clip_fraction"])
            last = index == len(slices) - 1
            if (index + 1) % cfg["GRADIENT_ACCUMULATION_STEPS"] == 0 or last:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), GRAD_CLIP)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return {"loss": sum(losses) / len(losses), "clip": sum(clip_fractions) / len(clip_fractions)}


def main() -> None:
    cfg = {name: globals()[name] for name in SMOKE} | (SMOKE if data.smoke_mode() else {})
    seed = int(os.environ.get("GROUNDLOOP_SEED", "0"))
    random.seed(seed)
    torch.manual_seed(seed)
    device = pick_device()
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    clock = harness.TrainingClock()
    tokenizer = data.load_tokenizer()
    policy = data.load_base_model(
        device, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    if GRADIENT_CHECKPOINTING and device.type == "cuda":
        policy.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(
        policy.parameters(),
        lr=cfg["LEARNING_RATE"],
        betas=(BETA1, BETA2),
        weight_decay=WEIGHT_DECAY,
    )
    use_vllm = (
        os.environ.get("GRPO_MATH_ENGINE", "vllm") == "vllm"
        and device.type == "cuda"
        and not data.smoke_mode()
        and importlib.util.find_spec("vllm") is not None
    )
    llm = start_vllm(seed) if use_vllm else None
    problems = data.load_problems("train")
    print(
        f"GRPO on {len(problems)} problems, rollouts with {'vLLM' if llm else 'HF generate'}, "
        f"budget {clock.budget:g} s",
        flush=True,
    )

    last_saved, completed, step_seconds = 0, 0, 0.0
    for step in range(1, cfg["GRPO_STEPS"] + 1):
        if step > 1 and clock.seconds_left() < 1.5 * step_seconds:
            print(
                f"stopping before step {step}: {clock.seconds_left():.0f} s left, a step "
                f"takes {step_seconds:.0f} s",
                flush=True,
            )
            break
        began = time.monotonic()
        batch = random.sample(problems, cfg["ROLLOUT_PROBLEMS"])
        group = cfg["GROUP_SIZE"]
        prompts = [data.format_prompt(p["problem"]) for p in batch for _ in range(group)]
        answers = [p["answer"] for p in batch for _ in range(group)]
        if llm:
            responses = sample_vllm(llm, prompts, cfg)
        else:
            responses = sample_hf(policy, tokenizer, prompts, cfg, device)
        scored = [grader.reward(r, a) for r, a in zip(responses, answers, strict=True)]
        rewards = torch.tensor([s["reward"] for s in scored])
        if LOSS_TYPE == "no_baseline":
            advantages = rewards.clone()
        else:
            advantages = group_normalized_advantages(rewards, group)
        rollouts = tokenize_rollouts(tokenizer, prompts, responses)
        stats = grpo_update(policy, optimizer, rollouts, advantages, cfg, device)
        if llm:
            push_weights_to_vllm(llm, policy)
        step_seconds, completed = time.monotonic() - began, step
        format_rate = sum(s["format_reward"] for s in scored) / len(scored)
        print(
            f"step {step} | reward {rewards.mean():.3f} | format {format_rate:.3f} | loss "
            f"{stats['loss']:.4f} | clip {stats['clip']:.3f} | {step_seconds:.1f} s | "
            f"{clock.training_seconds():.0f} s total",
            flush=True,
        )
        if step % cfg["CHECKPOINT_EVERY"] == 0:
            harness.save_checkpoint(policy, step, clock)
            last_saved = step
    if last_saved != completed:
        harness.save_checkpoint(policy, completed, clock)


if __name__ == "__main__":
    main()
