"""Token prices and usage arithmetic: what a model call costs, and totals over calls.

Prices are dollars per million tokens, keyed "provider:model" (a bare model name or a full
"openai-compatible:model@url" label also match). The table in force is recorded in
SearchStarted.price_table, so a search's dollars can be recomputed and never change when list
prices do. Models missing from the table (local servers, usually) cost $0.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from groundloop.events import ModelPrice, Usage

# List prices in dollars per million tokens (input, output) when this table was written.
# Override with GROUNDLOOP_LLM_PRICES (JSON) or GROUNDLOOP_LLM_PRICES_FILE; the table in force
# is what a search records, so a later price change never rewrites an old search's cost.
DEFAULT_PRICES: dict[str, ModelPrice] = {
    "anthropic:claude-opus-4-1": ModelPrice(input_per_mtok=15.0, output_per_mtok=75.0),
    "anthropic:claude-sonnet-4-5": ModelPrice(input_per_mtok=3.0, output_per_mtok=15.0),
    "anthropic:claude-sonnet-4": ModelPrice(input_per_mtok=3.0, output_per_mtok=15.0),
    "anthropic:claude-haiku-4-5": ModelPrice(input_per_mtok=1.0, output_per_mtok=5.0),
    "openai:gpt-5": ModelPrice(input_per_mtok=1.25, output_per_mtok=10.0),
    "openai:gpt-5-mini": ModelPrice(input_per_mtok=0.25, output_per_mtok=2.0),
    "openai:gpt-5-nano": ModelPrice(input_per_mtok=0.05, output_per_mtok=0.4),
    "openai:gpt-4.1": ModelPrice(input_per_mtok=2.0, output_per_mtok=8.0),
    "openai:gpt-4o": ModelPrice(input_per_mtok=2.5, output_per_mtok=10.0),
    "openai:o3": ModelPrice(input_per_mtok=2.0, output_per_mtok=8.0),
}


class _Spec(Protocol):
    # Read-only, so a frozen ModelSpec (whose provider is a Literal) matches.
    @property
    def provider(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def label(self) -> str: ...


def load_price_table(
    prices_file: Path | None = None, overrides: Mapping[str, ModelPrice] | None = None
) -> dict[str, ModelPrice]:
    """DEFAULT_PRICES, then a JSON file's entries, then `overrides`. ValueError says what to fix."""
    table = dict(DEFAULT_PRICES)
    if prices_file is not None:
        try:
            raw = json.loads(Path(prices_file).read_text())
            table.update({k: ModelPrice.model_validate(v) for k, v in raw.items()})
        except (OSError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"price file {prices_file}: {exc}; it must be JSON "
                '{"provider:model": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}'
            ) from None
    table.update(overrides or {})
    return table


def price_for(table: Mapping[str, ModelPrice], spec: _Spec) -> ModelPrice | None:
    for key in (spec.label, f"{spec.provider}:{spec.model}", spec.model):
        if key in table:
            return table[key]
    return None


def cost_usd(price: ModelPrice | None, input_tokens: int, output_tokens: int) -> float:
    if price is None:
        return 0.0
    return (input_tokens * price.input_per_mtok + output_tokens * price.output_per_mtok) / 1e6


def add_usage(*usages: Usage) -> Usage:
    return Usage(
        calls=sum(u.calls for u in usages),
        input_tokens=sum(u.input_tokens for u in usages),
        output_tokens=sum(u.output_tokens for u in usages),
        cost_usd=sum(u.cost_usd for u in usages),
    )
