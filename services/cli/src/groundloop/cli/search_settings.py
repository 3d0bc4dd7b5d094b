"""What `groundloop search` is asked to do: the SearchStarted it publishes, the checks of its
choices (each error lists the valid values), the model limits it hands its services, and how
it tells a search that ended badly (SearchEndedBadly, exit code 1)."""

from __future__ import annotations

import typer
from rich.console import Console

from groundloop import events as ev
from groundloop.execution.environment import Environment

console = Console()

STRATEGIES = ("evolution", "best_of_n", "rl", "hybrid")
EDIT_FORMATS = ("diff", "search-replace", "whole-file")  # ImplementerSettings.edit_format
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
    strategy: str,
    generations: int,
    ideas: int,
    seed: int,
    model: str | None,
    implementer_model: str | None,
    baseline_seeds: int,
    final_top_k: int,
    final_seeds: int,
    budgets: ev.Budgets,
    deadline: float | None,
    ideas_per_call: int = 10,
    samples: int = 2,
    revisions: int = 2,
    edit_format: str | None = None,
    llm_settings: object | None = None,
    rl: ev.RLSettings | None = None,
) -> ev.SearchStarted:
    proposer = (
        ev.ProposerSettings(kind="llm", model=model, ideas_per_call=ideas_per_call)
        if model
        else ev.ProposerSettings(kind="knobs")
    )
    implementer = (
        ev.ImplementerSettings(
            kind="llm",
            model=implementer_model or model,
            samples=samples,
            revisions=revisions,
            edit_format=edit_format,  # type: ignore[arg-type]  # checked by check_choice
        )
        if model
        else ev.ImplementerSettings(kind="knobs")
    )
    prices: dict[str, ev.ModelPrice] = {}
    if model:  # the table in force is part of the record, so costs can be audited later
        prices = checked_prices([model, implementer_model or model], llm_settings)
    return ev.SearchStarted(
        event_id=ev.stable_id(search_id, "SearchStarted"),
        search_id=search_id,
        producer="cli",
        environment=env.name,
        environment_digest=env.digest(),
        strategy=strategy,  # type: ignore[arg-type]
        config=ev.SearchConfig(
            generations=generations,
            ideas_per_generation=ideas,
            baseline_seeds=baseline_seeds,
            final_top_k=final_top_k,
            final_seeds=final_seeds,
            generation_deadline_s=deadline,
            budgets=budgets,
        ),
        proposer=proposer,
        implementer=implementer,
        price_table=prices,
        seed=seed,
        rl=rl,
    )


def checked_prices(models: list[str], llm_settings: object | None) -> dict[str, ev.ModelPrice]:
    """The price table in force, with an entry for every model; exit 2 naming --price for a
    hosted model with no price. A server on this machine is recorded at $0 and said so."""
    from groundloop.llm.client import LLMError, LLMSettings, ModelSpec, model_price, price_table

    settings = llm_settings if isinstance(llm_settings, LLMSettings) else LLMSettings()
    try:
        table = price_table(settings)
        for name in dict.fromkeys(models):
            spec = ModelSpec.parse(name)
            price = model_price(spec, settings, table)
            if price is not None and spec.label not in table and spec.model not in table:
                table[spec.label] = price  # local: recorded as free, so the report shows $0
                console.print(f"{spec.label} is a server on this machine: its calls cost $0")
    except (LLMError, ValueError) as exc:
        console.print(f"[red]{exc}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
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
