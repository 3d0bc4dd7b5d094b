"""Token prices and usage arithmetic: what a model call costs, and totals over calls.

Prices are dollars per million tokens, keyed "provider:model" (a bare model name or a full
"openai-compatible:model@url" label also match). The built-in table is data, not code:
prices.toml next to this module, each entry with the date its price was read; a user file
(GROUNDLOOP_LLM_PRICES_FILE, TOML or JSON of the same shape) and explicit entries
(GROUNDLOOP_LLM_PRICES, `groundloop search --price`) override it. The table in force is
recorded in SearchStarted.price_table, so a search's dollars can be recomputed and never
change when list prices do. A hosted model missing from the table is refused
(`require_price`), never costed at $0; only a server on this machine is free.
"""

from __future__ import annotations

import ipaddress
import json
import tomllib
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from groundloop.events import ModelPrice, Usage

PRICES_RESOURCE = "prices.toml"
PRICE_FLAG = "--price MODEL=IN,OUT"  # dollars per million input / output tokens


class PriceUnknown(ValueError):
    """A hosted model with no price: its dollars could not be counted or budgeted."""


def _entries(raw: Mapping[str, Any], source: str) -> dict[str, ModelPrice]:
    """ModelPrice per key; `read_on` (the date the price was read) is checked and dropped."""
    table: dict[str, ModelPrice] = {}
    for key, value in raw.items():
        if not isinstance(value, Mapping):
            raise ValueError(f"{source}: entry {key!r} is not a table of prices")
        fields = {k: v for k, v in value.items() if k != "read_on"}
        table[key] = ModelPrice.model_validate(fields)
    return table


def builtin_price_entries() -> dict[str, dict[str, Any]]:
    """The shipped prices.toml as read: every entry with its `read_on` date."""
    text = resources.files("groundloop.llm").joinpath(PRICES_RESOURCE).read_text()
    return tomllib.loads(text)


def _builtin() -> dict[str, ModelPrice]:
    return _entries(builtin_price_entries(), PRICES_RESOURCE)


DEFAULT_PRICES: dict[str, ModelPrice] = _builtin()


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
    """DEFAULT_PRICES, then a TOML or JSON file's entries, then `overrides`. ValueError says
    what to fix."""
    table = dict(DEFAULT_PRICES)
    if prices_file is not None:
        path = Path(prices_file)
        try:
            text = path.read_text()
            raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
            table.update(_entries(raw, str(path)))
        except (OSError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"price file {prices_file}: {exc}; it must be TOML like prices.toml "
                '(["provider:model"] input_per_mtok = 3.0, output_per_mtok = 15.0) or JSON '
                '{"provider:model": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}'
            ) from None
    table.update(overrides or {})
    return table


def parse_price_flag(text: str) -> tuple[str, ModelPrice]:
    """`MODEL=IN,OUT` (dollars per million input and output tokens) as a table entry."""
    model, sep, numbers = text.partition("=")
    parts = numbers.split(",")
    try:
        if not sep or not model.strip() or len(parts) != 2:
            raise ValueError(text)
        price = ModelPrice(input_per_mtok=float(parts[0]), output_per_mtok=float(parts[1]))
    except ValueError:
        raise ValueError(
            f"{text!r} is not MODEL=IN,OUT; e.g. --price openai:gpt-5=1.25,10 "
            "(dollars per million input and output tokens)"
        ) from None
    return model.strip(), price


def is_local_url(url: str | None) -> bool:
    """A server on this machine (localhost, a loopback address): its calls cost nothing."""
    if not url:
        return False
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def price_for(table: Mapping[str, ModelPrice], spec: _Spec) -> ModelPrice | None:
    for key in (spec.label, f"{spec.provider}:{spec.model}", spec.model):
        if key in table:
            return table[key]
    return None


def require_price(
    table: Mapping[str, ModelPrice], spec: _Spec, base_url: str | None = None
) -> ModelPrice:
    """The model's price; $0 for a server on this machine (`base_url`, the spec's own URL
    first); PriceUnknown, naming the flag and the settings, for any other unpriced model."""
    price = price_for(table, spec)
    if price is not None:
        return price
    if is_local_url(getattr(spec, "base_url", None) or base_url):
        return ModelPrice(input_per_mtok=0.0, output_per_mtok=0.0)
    raise PriceUnknown(
        f"model {spec.label} has no known price, and a hosted model is never costed at $0 "
        f"(its dollar budget could not be kept); give its price with {PRICE_FLAG} (dollars "
        "per million input and output tokens), a GROUNDLOOP_LLM_PRICES_FILE entry, or "
        'GROUNDLOOP_LLM_PRICES=\'{"MODEL": {"input_per_mtok": IN, "output_per_mtok": OUT}}\''
    )


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


def spent_usd(events: Iterable[object]) -> float:
    """Dollars a search's model calls have cost so far, from its log: every event that carries
    the usage of model calls (ideas, patches, failed patches). The log, not a counter in one
    process, so every replica of every role sees the same figure."""
    total = 0.0
    for event in events:
        usage = getattr(event, "usage", None)
        if isinstance(usage, Usage):
            total += usage.cost_usd
    return total


def check_dollar_budget(budget: float | None, spent: float, next_call: float) -> None:
    """Refuse a model call that would take the search past its dollar budget. `next_call` is
    the expected cost of the call (the mean of the calls so far; 0 before the first)."""
    if budget is not None and spent + next_call > budget:
        from groundloop.llm.errors import DollarBudgetSpent

        raise DollarBudgetSpent(
            f"dollar budget spent: ${spent:.4f} of ${budget:.4f} used, and the next model call "
            f"is expected to cost ${next_call:.4f}; raise --dollars to go on"
        )
