"""What `groundloop search` is asked to do: the SearchStarted it publishes, the checks of its
choices (each error lists the valid values), the model limits it hands its services, and how
it tells a search that ended badly (SearchEndedBadly, exit code 1)."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from groundloop import events as ev
from groundloop import search_request
from groundloop.execution.environment import Environment
from groundloop.search_request import EDIT_FORMATS as EDIT_FORMATS
from groundloop.search_request import STRATEGIES as STRATEGIES

console = Console()
# SearchCompleted reasons of a search that could not run (decisions.py); they exit non-zero.
FAILED_REASONS = ("cannot run this search", "baseline failed")


class SearchEndedBadly(Exception):
    """The search stopped or failed; the message is its recorded reason."""


def check_choice(flag: str, value: str | None, valid: tuple[str, ...]) -> None:
    """Exit 2 with the valid values when `value` is not one of them."""
    if value is not None and value not in valid:
        console.print(
            f"[red]{flag} {value!r} is not valid; valid values: {', '.join(valid)}[/]",
            highlight=False,
        )
        raise typer.Exit(2)


def check_strategy(strategy: str) -> None:
    check_choice("--strategy", strategy, STRATEGIES)


def search_started_event(
    search_id: str,
    env: Environment,
    *,
    model: str | None,
    implementer_model: str | None,
    llm_settings: object | None = None,
    **choices: Any,
) -> ev.SearchStarted:
    """groundloop.search_request's SearchStarted (the API builds it the same way; `choices`
    are its keyword arguments), with the price table checked here: a hosted model with no
    price exits 2 naming --price."""
    prices: dict[str, ev.ModelPrice] = {}
    if model:  # the table in force is part of the record, so costs can be audited later
        prices = checked_prices([model, implementer_model or model], llm_settings)
    return search_request.search_started_event(
        search_id,
        env,
        model=model,
        implementer_model=implementer_model,
        price_table=prices,
        **choices,
    )


def checked_prices(models: list[str], llm_settings: object | None) -> dict[str, ev.ModelPrice]:
    """The price table in force, with an entry for every model; exit 2 naming --price for a
    hosted model with no price. A server on this machine is recorded at $0 and said so."""
    try:
        table, notes = search_request.priced_models(models, llm_settings)
    except ValueError as exc:  # LLMError subclasses that are ValueErrors, and bad model specs
        console.print(f"[red]{exc}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for note in notes:
        console.print(note)
    return table


def llm_overrides(
    model: str | None,
    concurrency: int | None,
    max_output_tokens: int | None,
    prices: list[str] | None = None,
) -> object | None:
    """LLMSettings (from the environment) with the command line's model limits and --price
    entries applied; None without a model (the knob proposer calls none)."""
    if not model:
        return None
    from groundloop.llm.client import LLMSettings
    from groundloop.llm.pricing import parse_price_flag

    base = LLMSettings()
    overrides: dict[str, object] = {}
    if concurrency is not None:
        overrides["max_concurrency"] = concurrency
    if max_output_tokens is not None:
        overrides["max_output_tokens"] = max_output_tokens
    try:
        entries = dict(parse_price_flag(text) for text in prices or [])
    except ValueError as exc:
        console.print(f"[red]--price: {exc}[/]", highlight=False)
        raise typer.Exit(2) from None
    if entries:
        overrides["prices"] = {**base.prices, **entries}
    return base.model_copy(update=overrides)
