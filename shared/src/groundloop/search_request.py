"""The SearchStarted that starts a search, built one way for every front end: the CLI
(`groundloop search`, groundloop.cli.search_settings) and the API (`POST /searches`,
groundloop.api.routes_control).

    search_started_event(search_id, env, strategy=…, generations=…, ideas=…, seed=…, …)
    priced_models(models, llm_settings) -> (price table, notes)   ValueError names --price
    default_deadline(env, ideas, slots)  -> seconds a generation may stay open

Pure: nothing here prints, exits or touches the bus; callers turn ValueError into their own
refusal (exit 2, HTTP 422).
"""

from __future__ import annotations

from groundloop import events as ev
from groundloop.execution.environment import Environment

STRATEGIES = ("evolution", "best_of_n", "rl", "hybrid")
EDIT_FORMATS = ("diff", "search-replace", "whole-file")  # ImplementerSettings.edit_format
RL_STRATEGIES = ("rl", "hybrid")
SCHEDULES = ("generational", "steady")  # SearchConfig.schedule


def default_deadline(env: Environment, ideas: int, slots: int) -> float:
    """A generation closes after this long even if some idea never became terminal (an
    ideator that wrote fewer ideas than planned, a lost message): three times the time its
    runs and pre-flights need back to back, and at least ten minutes."""
    budget = env.manifest.budget
    per_idea = (
        budget.wall_seconds + budget.grace_seconds + budget.eval_seconds + budget.smoke_seconds
    )
    return max(600.0, 3.0 * per_idea * ideas / max(slots, 1))


def priced_models(
    models: list[str], llm_settings: object | None
) -> tuple[dict[str, ev.ModelPrice], list[str]]:
    """The price table in force with an entry for every model, and notes for the user (a
    server on this machine is recorded at $0). ValueError for a hosted model
    with no price, or a model name that does not parse; the message says how to add one."""
    from groundloop.llm.client import LLMError, LLMSettings, ModelSpec, model_price, price_table

    settings = llm_settings if isinstance(llm_settings, LLMSettings) else LLMSettings()
    notes = []
    try:
        table = price_table(settings)
        for name in dict.fromkeys(models):
            spec = ModelSpec.parse(name)
            price = model_price(spec, settings, table)
            if price is not None and spec.label not in table and spec.model not in table:
                table[spec.label] = price  # local: recorded as free, so the report shows $0
                notes.append(f"{spec.label} is a server on this machine: its calls cost $0")
    except LLMError as exc:  # one kind of refusal for every caller
        raise ValueError(str(exc)) from None
    return table, notes


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
    price_table: dict[str, ev.ModelPrice] | None = None,
    ideas_per_call: int = 10,
    samples: int = 2,
    revisions: int = 2,
    edit_format: str | None = None,
    rl: ev.RLSettings | None = None,
    schedule: str = "generational",
) -> ev.SearchStarted:
    """The SearchStarted of a new search: the LLM proposer and implementer when `model` is
    given (the implementer defaults to the same model), the offline knob proposer otherwise.
    Its event id derives from the search id, so starting the same search twice stores it
    once. `price_table` (from priced_models) is recorded so costs can be audited later."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy {strategy!r} is not valid; valid values: {', '.join(STRATEGIES)}"
        )
    if schedule not in SCHEDULES:
        raise ValueError(
            f"schedule {schedule!r} is not valid; valid values: {', '.join(SCHEDULES)}"
        )
    if schedule == "steady" and strategy != "evolution":
        raise ValueError(
            f"schedule 'steady' overlaps generations, which only the evolution strategy can "
            f"do: {strategy} needs every result of a generation before the next opens "
            "(best_of_n has one generation; rl and hybrid train one policy step on each whole "
            "generation). Use --schedule generational, or --strategy evolution"
        )
    if edit_format is not None and edit_format not in EDIT_FORMATS:
        raise ValueError(
            f"edit format {edit_format!r} is not valid; valid values: {', '.join(EDIT_FORMATS)}"
        )
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
            edit_format=edit_format,  # type: ignore[arg-type]  # checked above
        )
        if model
        else ev.ImplementerSettings(kind="knobs")
    )
    return ev.SearchStarted(
        event_id=ev.stable_id(search_id, "SearchStarted"),
        search_id=search_id,
        producer="cli",  # whoever asks (CLI or API), the cli role records it
        environment=env.name,
        environment_digest=env.digest(),
        strategy=strategy,  # type: ignore[arg-type]  # checked above
        config=ev.SearchConfig(
            generations=generations,
            ideas_per_generation=ideas,
            baseline_seeds=baseline_seeds,
            final_top_k=final_top_k,
            final_seeds=final_seeds,
            generation_deadline_s=deadline,
            budgets=budgets,
            schedule=schedule,  # type: ignore[arg-type]  # checked above
        ),
        proposer=proposer,
        implementer=implementer,
        price_table=(price_table or {}) if model else {},
        seed=seed,
        rl=rl,
    )
