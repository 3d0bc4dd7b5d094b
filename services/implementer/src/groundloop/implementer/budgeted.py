"""A model client that refuses a call when it would take the search past its dollar budget.

The implementer makes up to samples × (revisions + 1) calls for one idea, several at once; each
is checked before it is made against the search's spend from the log plus what this idea's
calls have cost so far, the next call expected to cost their mean."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from groundloop.llm.client import Completion, LLMClient, Message
from groundloop.llm.pricing import check_dollar_budget
from groundloop.llm.structured import JsonSchema


class BudgetedClient:
    def __init__(self, inner: LLMClient, budget: float | None, spent_usd: float, mean_usd: float):
        self.inner, self.spec = inner, inner.spec
        self.budget, self.spent, self.mean = budget, spent_usd, mean_usd
        self.calls, self.here = 0, 0.0
        self._lock = threading.Lock()

    def complete(
        self,
        messages: Sequence[Message],
        *,
        system: str | None = None,
        max_tokens: int | None = None,
        thinking_budget: int | None = None,
        response_format: JsonSchema | None = None,
    ) -> Completion:
        with self._lock:  # samples run in threads: reserve the expected cost before calling
            expected = self.here / self.calls if self.calls else self.mean
            check_dollar_budget(self.budget, self.spent + self.here, expected)
            self.calls += 1
            self.here += expected
        completion = self.inner.complete(
            messages,
            system=system,
            max_tokens=max_tokens,
            thinking_budget=thinking_budget,
            response_format=response_format,
        )
        with self._lock:  # replace the reservation by what the call really cost
            self.here += completion.usage.cost_usd - expected
        return completion
