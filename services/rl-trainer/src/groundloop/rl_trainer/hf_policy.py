"""A Hugging Face causal LM as the ideator policy ("hf:<model>"), trained with LoRA adapters.

- Loading reads local files only (`local_files_only=True`): a folder holding config.json, the
  weights and the tokenizer, or a model already in the local Hugging Face cache. Nothing is
  downloaded here; a missing model is an error that says how to fetch it.
- The prompt is the environment's ideator prompt (`SamplingContext.prompt_text`), followed by
  the search's past ideas with their rewards when `past` is given (the paper's in-context
  trajectories), wrapped in the chat template when the tokenizer has one.
- `lora_rank` > 0: peft LoRA adapters on every linear layer of the transformer (the output
  head excluded) are the only trainable weights; the reference policy is the same model with
  the adapter disabled (the base model), and a checkpoint is the adapter and optimizer only.
  `lora_rank` 0 trains every weight; the reference is then a frozen copy and a checkpoint
  holds the whole model twice, so keep that for small models.
- `to_idea` reads the completion with the `parse_ideas` callable handed in by the service (the
  LLM ideator's parser) and keeps the first idea.
- On a CUDA machine the model runs there in bfloat16; on CPU in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from groundloop.rl_trainer.grpo import TokenBatch, completion_logps
from groundloop.rl_trainer.policy import (
    Completion,
    IdeaDraft,
    ParseIdeas,
    SamplingContext,
)
from groundloop.rl_trainer.torch_policy import TorchPolicy

PAST_TEXT_CHARS = 400  # each past idea is cut to this many characters in the prompt


class PolicyLoadError(RuntimeError):
    """The model or tokenizer for an hf policy cannot be loaded from local files."""


def past_block(past: Sequence[tuple[str, float]]) -> str:
    lines = [
        "Ideas already tried in this search and the reward each earned (0 means the run failed "
        "or timed out). Propose a new idea that should earn more than these:"
    ]
    for text, reward in past:
        flat = " ".join(text.split())
        if len(flat) > PAST_TEXT_CHARS:
            flat = flat[: PAST_TEXT_CHARS - 3] + "..."
        lines.append(f"- reward {reward:.4g}: {flat}")
    return "\n".join(lines)


def load_local(model_ref: str, device: torch.device) -> tuple:
    """(tokenizer, model) from a local folder or the local Hugging Face cache."""
    folder = Path(model_ref).expanduser()
    source = str(folder) if folder.is_dir() else model_ref
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        where = (
            f"the folder {folder} has no loadable model and tokenizer"
            if folder.is_dir()
            else f"{model_ref!r} is neither a local model folder nor a model in the local "
            "Hugging Face cache"
        )
        raise PolicyLoadError(
            f"cannot load the hf policy: {where} ({type(exc).__name__}: {exc}). Nothing is "
            f"downloaded at run time: fetch it first with `huggingface-cli download {model_ref}` "
            "(or `hf download`), or give hf:<folder> holding config.json, the weights and the "
            "tokenizer files (save_pretrained writes them)."
        ) from None
    return tokenizer, model


class HFPolicy(TorchPolicy):
    kind = "hf"
    warm_up_learning_rate = 1e-4

    def __init__(
        self,
        model_ref: str,
        seed: int,
        parse_ideas: ParseIdeas,
        lora_rank: int = 8,
        device: torch.device | None = None,
    ):
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 trains every weight), got {lora_rank}")
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model_name = model_ref
        self.parse_ideas = parse_ideas
        self.lora_rank = lora_rank
        self.tokenizer, model = load_local(model_ref, device)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise PolicyLoadError(
                f"the tokenizer of {model_ref} has no eos_token; set one (tokenizer_config.json) "
                "so completions can end"
            )
        stop_ids = {eos}
        configured = getattr(model.generation_config, "eos_token_id", None)
        if configured is not None:
            stop_ids |= set(configured if isinstance(configured, list) else [configured])
        pad = self.tokenizer.pad_token_id
        if lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=lora_rank,
                lora_alpha=2 * lora_rank,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            )
            with torch.random.fork_rng(devices=[]):  # seeded adapter init, global RNG untouched
                torch.manual_seed(seed)
                model = get_peft_model(model, config)
        super().__init__(model, eos if pad is None else pad, stop_ids, device)

    # ------------------------------------------------------------------ text

    def render_prompt(self, context: SamplingContext) -> str:
        text = context.prompt_text
        if context.past:
            text = f"{text}\n\n{past_block(context.past)}"
        return text

    def prompt_ids(self, context: SamplingContext) -> list[int]:
        text = self.render_prompt(context)
        if getattr(self.tokenizer, "chat_template", None):
            chat = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return list(self.tokenizer(chat, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, completion_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(completion_ids), skip_special_tokens=True)

    def example_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(ids) + [self.tokenizer.eos_token_id]

    def warm_up_prompt_ids(self, context: SamplingContext | None) -> list[int]:
        if context is None:
            raise ValueError(
                "the hf policy warms up on the ideator prompt: pass "
                "context=SamplingContext(prompt_text=...) to warm_up"
            )
        return self.prompt_ids(context)

    def to_idea(self, completion: Completion) -> IdeaDraft:
        ideas = self.parse_ideas(completion.text)
        if not ideas:
            return IdeaDraft(
                title="Unparsable idea",
                text=completion.text or "(empty completion)",
                knobs=None,
                valid=False,
                problem="the parser found no idea in the completion",
            )
        title, text = ideas[0]
        return IdeaDraft(title=title, text=text, knobs=None, valid=True)

    # ------------------------------------------------------------------ LoRA specifics

    def _needs_reference_copy(self) -> bool:
        return self.lora_rank == 0

    def reference_logps(self, batch: TokenBatch, temperature: float) -> torch.Tensor:
        if self.lora_rank == 0:
            return super().reference_logps(batch, temperature)
        with self.model.disable_adapter():  # type: ignore[operator]
            return completion_logps(self.model, batch, temperature)

    def model_state(self) -> dict[str, torch.Tensor]:
        if self.lora_rank == 0:
            return super().model_state()
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.lora_rank == 0:
            return super().load_model_state(state)
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"checkpoint has adapter weights this model lacks: {unexpected[:5]}")

    def fingerprint(self) -> str:
        config = self.model.config  # type: ignore[union-attr]
        parts = [
            ",".join(getattr(config, "architectures", None) or [type(self.model).__name__]),
            str(getattr(config, "vocab_size", "?")),
            str(getattr(config, "hidden_size", "?")),
            str(getattr(config, "num_hidden_layers", "?")),
            f"lora{self.lora_rank}",
        ]
        return "/".join(parts)
