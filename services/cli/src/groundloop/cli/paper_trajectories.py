"""Trade trajectories with the paper's released format: one row per idea (export / import).

export_paper(events)                        -> one row per idea, the paper's fields
import_paper(rows, search_id, environment)  -> PaperImport: a completed search's log
                                               ("history:import") and the rows it skipped

`result` is an object keyed by metric name ({"val_loss": 3.21}), as in the released files;
import also reads a bare number. Reading one row lives in paper_rows.py.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from groundloop import events as ev
from groundloop.cli.history_error import HistoryError
from groundloop.cli.paper_rows import MAX_IMPORTED_DIFF_BYTES as MAX_IMPORTED_DIFF_BYTES
from groundloop.cli.paper_rows import PAPER_FIELDS as PAPER_FIELDS
from groundloop.cli.paper_rows import CheckedRow, PaperImport, RowNote, Skip, check_row
from groundloop.consumer import HISTORY_PREFIX

if TYPE_CHECKING:
    from groundloop.execution.environment import Environment

IMPORT_PRODUCER = HISTORY_PREFIX + "import"


# ---------------------------------------------------------------------------- export


def export_paper(
    events: list[ev.Event], diffs: Mapping[str, str] | None = None, metric: str | None = None
) -> list[dict]:
    """One row per idea with the paper's released trajectory fields, in (epoch, proposal)
    order: ideator_model (the proposer's model, or its kind, e.g. "knobs"), executor_model
    (the implementer's), env, epoch, idea (title and text), code_diff ("" when no patch),
    result ({metric name: mean score of the idea's succeeded search runs}, or None).

    `diffs` maps object-store keys to text, for patches whose diff was too large to inline.
    `metric` is the environment's metric name; by default the one the runs reported."""
    started = next((e for e in events if isinstance(e, ev.SearchStarted)), None)
    ideas = [e for e in events if isinstance(e, ev.IdeaProposed) and e.mode != "baseline"]
    first_idea: dict[str, ev.IdeaProposed] = {}
    for idea in ideas:
        first_idea.setdefault(idea.idea_id, idea)
    patches: dict[str, ev.PatchReady] = {}
    runs: dict[str, ev.RunCompleted] = {}
    for e in events:
        if isinstance(e, ev.PatchReady):
            patches.setdefault(e.idea_id, e)
        elif isinstance(e, ev.RunCompleted) and e.purpose == "search" and e.idea_id is not None:
            held = runs.get(e.run_id)  # a run reported twice: a success beats a loss record
            if held is None or (held.status != "succeeded" and e.status == "succeeded"):
                runs[e.run_id] = e
    scores: dict[str, list[float]] = defaultdict(list)
    for run in runs.values():
        if run.status == "succeeded" and run.score is not None:
            scores[run.idea_id].append(run.score)  # type: ignore[index]
    name = metric or _metric_name(runs.values())
    default_executor = (
        _label(started.implementer.model, started.implementer.kind) if started else ""
    )
    rows = []
    for idea in sorted(first_idea.values(), key=lambda i: i.generation):  # stable: log order
        patch = patches.get(idea.idea_id)
        runs_scores = scores.get(idea.idea_id)
        rows.append(
            {
                "ideator_model": _label(idea.proposer.model, idea.proposer.kind),
                "executor_model": (
                    _label(patch.implementer.model, patch.implementer.kind)
                    if patch
                    else default_executor
                ),
                "env": started.environment if started else "",
                "epoch": int(idea.generation),
                "idea": _idea_text(idea.title, idea.text),
                "code_diff": _diff_of(patch, diffs) if patch else "",
                "result": {name: float(math.fsum(runs_scores) / len(runs_scores))}
                if runs_scores
                else None,
            }
        )
    return rows


def _metric_name(runs: Iterable[ev.RunCompleted]) -> str:
    """The metric the runs scored: the name whose reported value is the score."""
    names = Counter(
        key
        for run in runs
        if run.score is not None
        for key, value in run.metrics.items()
        if value == run.score
    )
    return names.most_common(1)[0][0] if names else "score"


def _label(model: str | None, kind: str) -> str:
    return model or kind


def _idea_text(title: str, text: str) -> str:
    """The idea as one string: the text, preceded by its title unless it already opens it."""
    return text if text.lstrip().startswith(title) else f"{title}\n\n{text}"


def _diff_of(patch: ev.PatchReady, diffs: Mapping[str, str] | None) -> str:
    if patch.diff is not None:
        return patch.diff
    if patch.diff_key and diffs and patch.diff_key in diffs:
        return diffs[patch.diff_key]
    raise HistoryError(
        f"patch {patch.patch_id} keeps its diff in the object store "
        f"({patch.diff_key}); pass it in `diffs` (the CLI fetches it)"
    )


# ---------------------------------------------------------------------------- import


def import_paper(
    rows: list[Any],
    search_id: str,
    environment: Environment | None,
    occurred_at: datetime | None = None,
) -> PaperImport:
    """A completed search's log from rows in the paper's format, every event with producer
    "history:import", so nothing is implemented or run again and the evolver folds it as done;
    with the rows it skipped (a missing idea or epoch, an unreadable diff, a result that names
    another metric ...) and those it imported as failed runs (no or a non-finite result).

    `result` is {metric name: value} (the released files) or a bare number, read as the
    environment's metric. Per row: IdeaProposed (mode "fresh": the rows do not say how an
    idea was asked for; proposer kind "import", model = ideator_model, title = the idea's first
    line); PatchReady when code_diff is non-empty (implementer kind "import"), else
    PatchFailed; RunCompleted, succeeded with score = result and reward by the environment's
    metric transform when there is a finite result (reward = result without an environment),
    failed otherwise (no run at all for a row with neither diff nor result). Rows come in epoch
    order with a GenerationAdvanced before each epoch. SearchCompleted (reason "imported") and
    then SearchStarted close the log: a live evolver folds the facts, deciding nothing before
    it has seen SearchStarted, and then finds the search already completed, so it requests no
    baseline or re-evaluation run. Executor models of rows without a diff come back on export
    as the search's implementer setting (the most common executor_model)."""
    if not ev.is_valid_search_id(search_id):
        raise HistoryError(f"{search_id!r} is not a valid search id ({ev.SEARCH_ID_PATTERN})")
    metric = environment.manifest.metric if environment is not None else None
    checked: list[CheckedRow] = []
    skipped: list[RowNote] = []
    unscored: list[RowNote] = []
    for n, raw in enumerate(rows, start=1):
        try:
            row = check_row(raw, metric.name if metric else None)
        except Skip as exc:
            skipped.append(RowNote(n, str(exc)))
            continue
        checked.append(row)
        if row.unscored:
            unscored.append(RowNote(n, row.unscored))
    if not checked:
        reasons = "; ".join(f"row {s.row}: {s.reason}" for s in skipped[:5])
        raise HistoryError("no rows to import" + (f" ({reasons})" if reasons else ""))
    envs = sorted({row.env for row in checked if row.env})
    if len(envs) > 1:
        raise HistoryError(
            f"rows hold {len(envs)} environments ({', '.join(envs)}); a search has "
            "one: split the file by env, e.g. jq -c 'select(.env==\"NAME\")'"
        )
    at = occurred_at or datetime.now(UTC)
    metric = environment.manifest.metric if environment is not None else None
    env_name = environment.name if environment is not None else (envs or ["unknown"])[0]
    digest = (
        environment.digest()
        if environment is not None
        else "unknown (imported without environment)"
    )
    resource_class = environment.manifest.resource_class if environment is not None else "cpu"
    ordered = sorted(checked, key=lambda r: r.epoch)  # stable: file order within an epoch
    per_epoch = Counter(row.epoch for row in ordered)

    def eid(*parts: object) -> str:
        return ev.stable_id(search_id, "import", *parts)

    def base(key: tuple, cause: str | None) -> dict[str, Any]:
        return {
            "event_id": eid(*key),
            "search_id": search_id,
            "occurred_at": at,
            "causation_id": cause,
            "producer": IMPORT_PRODUCER,
        }

    start_id = eid("SearchStarted")
    out: list[ev.Event] = []
    results: list[tuple[str, int, float, float]] = []  # idea id, epoch, score, reward
    epoch_event: dict[int, str] = {}
    for n, row in enumerate(ordered):
        epoch = row.epoch
        if epoch not in epoch_event:
            out.append(
                _generation(base(("generation", epoch), start_id), epoch, per_epoch[epoch], results)
            )
            epoch_event[epoch] = out[-1].event_id
        idea_id, diff, score = eid("idea", n), row.code_diff, row.result
        idea = ev.IdeaProposed(
            **base((n, "IdeaProposed"), epoch_event[epoch]),
            idea_id=idea_id,
            generation=epoch,
            mode="fresh",
            title=_title(row.idea),
            text=row.idea,
            proposer=ev.ProposerInfo(kind="import", model=row.ideator_model),
        )
        out.append(idea)
        patch_id: str | None = None
        if diff:
            patch_id = eid("patch", n)
            out.append(
                ev.PatchReady(
                    **base((n, "PatchReady"), idea.event_id),
                    patch_id=patch_id,
                    idea_id=idea_id,
                    generation=epoch,
                    environment=env_name,
                    environment_digest=digest,
                    resource_class=resource_class,
                    diff=diff,
                    diff_digest=hashlib.sha256(diff.encode()).hexdigest(),
                    patched_digest="unknown",
                    files_changed=row.files_changed,
                    implementer=ev.ImplementerInfo(kind="import", model=row.executor_model),
                    preflight=ev.PreflightReport(
                        passed=True,
                        checks=[
                            ev.PreflightCheck(
                                name="imported",
                                ok=True,
                                detail="not run: imported from a trajectory file",
                            )
                        ],
                    ),
                )
            )
        else:
            out.append(
                ev.PatchFailed(
                    **base((n, "PatchFailed"), idea.event_id),
                    idea_id=idea_id,
                    generation=epoch,
                    attempts=1,
                    stage="model",
                    last_error="the imported trajectory has no code_diff",
                )
            )
        if not diff and score is None:  # nothing was run: no run to record
            continue
        reward = 0.0 if score is None else metric.to_reward(score) if metric else score
        out.append(
            ev.RunCompleted(
                **base((n, "RunCompleted"), out[-1].event_id),
                run_id=eid("run", n),
                patch_id=patch_id,
                idea_id=idea_id,
                generation=epoch,
                purpose="search",
                status="succeeded" if score is not None else "failed",
                score=score,
                reward=reward,
                seed=0,
                metrics={metric.name: score} if metric and score is not None else {},
                reason=None if score is not None else f"the imported trajectory has {row.unscored}",
            )
        )
        if score is not None:
            results.append((idea_id, epoch, score, reward))
    best = max(results, key=lambda r: r[3], default=None)
    out.append(
        ev.SearchCompleted(
            **base(("SearchCompleted",), start_id),
            reason="imported",
            best_idea_id=best[0] if best else None,
            best_score=best[2] if best else None,
            totals=ev.Totals(
                ideas=len(ordered),
                patches=sum(1 for r in ordered if r.code_diff),
                runs=sum(1 for e in out if isinstance(e, ev.RunCompleted)),
            ),
        )
    )
    out.append(
        ev.SearchStarted(
            **base(("SearchStarted",), None),
            environment=env_name,
            environment_digest=digest,
            strategy="evolution",
            config=ev.SearchConfig(
                generations=max(per_epoch) + 1, ideas_per_generation=max(per_epoch.values())
            ),
            proposer=_proposer_settings(ordered),
            implementer=_implementer_settings(ordered),
        )
    )
    return PaperImport(
        events=out, rows=len(rows), imported=len(ordered), skipped=skipped, unscored=unscored
    )


def _title(idea: str) -> str:
    """The idea's first non-empty line, shortened (export puts the text back whole)."""
    first = next((line.strip() for line in idea.splitlines() if line.strip()), "")
    return first[:200]


def _generation(
    fields: dict[str, Any], epoch: int, count: int, results: list[tuple[str, int, float, float]]
) -> ev.GenerationAdvanced:
    """GenerationAdvanced of an imported epoch, with the best-so-far of earlier epochs."""
    best = max(results, key=lambda r: r[3], default=None)
    return ev.GenerationAdvanced(
        **fields,
        generation=epoch,
        plan=ev.GenerationPlan(fresh=count),
        best_so_far=ev.Scored(idea_id=best[0], score=best[2]) if best else None,
    )


def _proposer_settings(rows: list[CheckedRow]) -> ev.ProposerSettings:
    model = Counter(r.ideator_model for r in rows).most_common(1)[0][0]
    return (
        ev.ProposerSettings(kind="knobs")
        if model == "knobs"
        else ev.ProposerSettings(kind="llm", model=model)
    )


def _implementer_settings(rows: list[CheckedRow]) -> ev.ImplementerSettings:
    model = Counter(r.executor_model for r in rows).most_common(1)[0][0]
    if model == "knobs":
        return ev.ImplementerSettings(kind="knobs")
    return ev.ImplementerSettings(kind="llm", model=model)
