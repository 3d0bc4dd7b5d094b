"""grpo-math rollouts (editable): how responses are sampled from the policy during training.

train.py calls sample_vllm (vLLM in this process, when installed on a GPU; start_vllm once,
push_weights_to_vllm after every update) or sample_hf (HF generate) on ROLLOUT_PROBLEMS x
GROUP_SIZE r1_zero prompts, with cfg["MAX_NEW_TOKENS"] / cfg["MIN_NEW_TOKENS"] from train.py,
and grades what they return with the protected grader. Responses stop at "</answer>".
Change how rollouts are sampled here (temperature, top-p, stopping, engine settings).
"""

from __future__ import annotations

import os

import torch

import data

SAMPLING_TEMPERATURE = 1.0
HF_GENERATION_BATCH = 128  # sequences per HF generate call
VLLM_GPU_MEMORY = 0.35  # share of the GPU vLLM may take; the rest is for training


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
