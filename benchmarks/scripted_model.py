"""The scripted model of benchmarks/pipeline.py: instant, distinct ideas that name a learning
rate, and the unified diff that sets it, as a local OpenAI-compatible server answers them
(tests/llm_server.py)."""

from __future__ import annotations

import random
import re
import threading

from groundloop.execution.applier import make_diff
from groundloop.execution.environment import Environment
from tests.llm_server import Reply, Request

# Words the scripted ideas are drawn from: realistic lengths and letters, so the ideator's
# duplicate filter sees English-like text, yet any two ideas are far from near-duplicates.
VOCABULARY = (
    "learning rate schedule warmup cosine decay momentum width batch gradient clipping "
    "weight noise layer norm residual stream attention head dropout label smoothing "
    "optimizer step size curvature plateau loss landscape sharp minima generalisation "
    "validation score stability early phase late phase anneal restart cyclical linear "
    "exponential inverse square root lookahead averaging polyak ema shadow weights bias "
    "correction adaptive moment second order preconditioner diagonal factored memory "
    "budget throughput tokens data order curriculum easy hard examples mixing ratio "
    "initialisation scale fan variance preserving orthogonal spectral radius depth "
    "capacity bottleneck embedding tied untied vocabulary frequency regularisation decay "
    "coupled decoupled sparse dense signal trade off measure compare baseline improve"
).split()


class ScriptedModel:
    """Instant answers for the ideator (distinct ideas naming a learning rate) and the
    implementer (the unified diff that sets that learning rate)."""

    def __init__(self, env: Environment, seed: int = 0):
        self.rng = random.Random(seed)
        self.config = env.editable_sources()["config.py"]
        self.lock = threading.Lock()

    def idea(self) -> str:
        with self.lock:
            rate = 10 ** self.rng.uniform(-4, -1)
            words = " ".join(self.rng.choice(VOCABULARY) for _ in range(55))
        return (
            f"[Experiment] Try learning rate {rate:.6g} because {words}.\n"
            f"[Code Changes] In config.py set LEARNING_RATE to lr:{rate:.6g} and keep the rest.\n"
            "[End]"
        )

    def reply(self, request: Request) -> Reply:
        text = request.all_text
        if "You implement a research idea" in text:
            found = re.search(r"lr:([0-9.e+-]+)", text)
            rate = float(found.group(1)) if found else 1e-3
            after = re.sub(
                r"(?m)^LEARNING_RATE = [^#\n]*",
                f"LEARNING_RATE = {rate!r}  ",
                self.config,
            )
            diff = make_diff({"config.py": self.config}, {"config.py": after})
            return Reply(text=f"```diff\n{diff}```", input_tokens=1500, output_tokens=120)
        wanted = re.search(r"(?:Propose|Brainstorm) (\d+) ", request.last_user_text)
        count = int(wanted.group(1)) if wanted else 10
        body = "\n\n".join(self.idea() for _ in range(max(1, min(count, 10))))
        return Reply(text=body, input_tokens=3000, output_tokens=150 * count)
