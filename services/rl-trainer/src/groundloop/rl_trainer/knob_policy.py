"""The offline default policy ("knobs-lm"): a tiny GPT-2 built from a config in code (2 layers,
64 dims, no downloaded weights) over the knob vocabulary of `knob_vocab.py`.

It writes knob ideas (`WIDTH = 64 ; SCHEDULE = cosine`) without any constraint on decoding: an
untrained or badly trained model writes nonsense, which `to_idea` marks invalid and which earns
0, so validity itself is learnt. `warm_up` with no examples trains on `knob_examples` (random
valid settings of 1 to 3 knobs), so that step 0 already writes executable, diverse ideas.

The prompt is the <bos> token alone: this policy ignores `SamplingContext.prompt_text` and
`past` (a word model over knob settings has nothing to read in them; in-context trajectories
are an hf-policy feature).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from groundloop.manifest import Manifest
from groundloop.rl_trainer.knob_vocab import MAX_KNOBS, KnobVocabulary, value_word
from groundloop.rl_trainer.policy import (
    KNOBS_LM,
    Completion,
    GRPOSettings,
    IdeaDraft,
    SamplingContext,
)
from groundloop.rl_trainer.torch_policy import TorchPolicy

MODEL_NAME = "groundloop-knob-lm"
EMBED, LAYERS, HEADS = 64, 2, 4
# The longest valid completion: MAX_KNOBS clauses of 3 words, separators between, <eos>. A few
# more tokens let an over-long answer show up as "too many settings" rather than cut short.
MAX_COMPLETION = MAX_KNOBS * 4 + 4
WARM_UP_EXAMPLES = 512
WARM_UP_STEPS = 300


def knob_examples(manifest: Manifest, n: int, seed: int) -> list[tuple[str, float]]:
    """n random valid knob ideas as completion texts, each changing 1 to 3 knobs to grid
    values (in manifest order), weight 1.0: the default warm-up data, so the policy starts valid and diverse."""
    vocab = KnobVocabulary(manifest)
    rng = random.Random(f"knob-examples/{seed}")
    names = [name for name, grid in vocab.grids.items() if grid]
    out = []
    for _ in range(n):
        picked = set(rng.sample(names, rng.randint(1, min(3, len(names)))))
        # In manifest order: one spelling per idea, and "no knob twice" becomes "names only
        # move forward", which a two-layer model learns far sooner than remembering a set.
        chosen = [name for name in names if name in picked]
        clauses = [f"{name} = {value_word(rng.choice(vocab.grids[name]))}" for name in chosen]
        out.append((" ; ".join(clauses), 1.0))
    return out


class KnobLMPolicy(TorchPolicy):
    kind = KNOBS_LM
    model_name = MODEL_NAME
    warm_up_learning_rate = 3e-3
    threads = 1

    def __init__(self, manifest: Manifest, seed: int):
        self.manifest = manifest
        self.vocab = KnobVocabulary(manifest)
        self.config = GPT2Config(
            vocab_size=len(self.vocab.words),
            n_positions=MAX_COMPLETION + 8,
            n_embd=EMBED,
            n_layer=LAYERS,
            n_head=HEADS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=self.vocab.bos_id,
            eos_token_id=self.vocab.eos_id,
            pad_token_id=self.vocab.pad_id,
        )
        with torch.random.fork_rng(devices=[]):  # seeded init without touching global state
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(self.config)
        super().__init__(model, self.vocab.pad_id, {self.vocab.eos_id}, torch.device("cpu"))
        self.seed = seed

    def prompt_ids(self, context: SamplingContext) -> list[int]:
        return [self.vocab.bos_id]

    def warm_up_prompt_ids(self, context: SamplingContext | None) -> list[int]:
        return [self.vocab.bos_id]

    def decode(self, completion_ids: Sequence[int]) -> str:
        return self.vocab.decode(completion_ids)

    def example_ids(self, text: str) -> list[int]:
        return self.vocab.encode(self.vocab.example_words(text)) + [self.vocab.eos_id]

    def max_new_tokens(self, settings: GRPOSettings) -> int:
        return min(settings.max_new_tokens, MAX_COMPLETION)

    def to_idea(self, completion: Completion) -> IdeaDraft:
        if completion.completion_ids and completion.completion_ids[-1] != self.vocab.eos_id:
            draft = self.vocab.parse(completion.text)
            if draft.valid:  # parsable so far, but the policy never finished its idea
                problem = f"no end after {len(completion.completion_ids)} tokens"
                return IdeaDraft(
                    title="Unfinished knob setting",
                    text=f"The policy wrote {completion.text!r} and did not stop: {problem}.",
                    knobs=None,
                    valid=False,
                    problem=problem,
                )
            return draft
        return self.vocab.parse(completion.text)

    def render(self, knobs: dict[str, object]) -> str:
        """A knob idea (e.g. IdeaProposed.knobs of an earlier search) as a warm-up text."""
        return self.vocab.render(knobs)

    def warm_up(
        self,
        examples: list[tuple[str, float]],
        steps: int = WARM_UP_STEPS,
        seed: int = 0,
        learning_rate: float | None = None,
        context: SamplingContext | None = None,
    ) -> float:
        """Without examples, trains on `knob_examples(manifest, 512, seed)`. Example texts are
        knob settings `NAME = value ; NAME = value`; values off the grid snap to the nearest
        grid value (`KnobVocabulary.example_words`)."""
        if not examples:
            examples = knob_examples(self.manifest, WARM_UP_EXAMPLES, seed)
        return super().warm_up(examples, steps, seed, learning_rate, context)

    def fingerprint(self) -> str:
        shape = f"{self.vocab.fingerprint()}/{EMBED}x{LAYERS}x{HEADS}"
        return hashlib.sha256(shape.encode()).hexdigest()[:16]
