"""What a search did, per generation, from its events alone (live, finished, forked or
imported): the numbers `groundloop analyze` writes and the dashboard can serve.

    analyze_events(events, *, sources=None, knob_names=(), diffs=None, measure=None,
                   judge=None) -> dict            plain JSON values, see ANALYSIS_KEYS

Per generation (ideas of mode "baseline" are the unpatched baseline, not ideas, and are left
out; only search-split runs count, never the final re-evaluation):

- execution rate: ideas with a valid run (a succeeded search run with a score) ÷ ideas whose
  outcome is known; ideas still waiting for a patch or a run are counted as `pending`, not as
  failures, so a live search's open generation is not understated. Failure reasons: the
  patch's failing stage, or the status of the idea's last run.
- idea classes (idea_classes.py): hyper-parameter vs algorithmic from the patch, with each
  class's share and scores; the same by the LLM judge (idea_judge.py) when one is given, and
  how often the two agree.
- diversity (diversity.py): mean pairwise similarity of the generation's idea texts
  (diversity = 1 − it) and the distinct-idea fraction.
- scores: an idea's score is the mean over its valid runs (groundloop.ranking); per
  generation the best idea's (highest mean reward) and the mean over ideas, and the best so far.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from groundloop import events as ev
from groundloop import ranking
from groundloop.analysis.diversity import (
    SimilarityMeasure,
    TfidfSimilarity,
    distinct_fraction,
    mean_pairwise,
)
from groundloop.analysis.idea_classes import CLASS_LABELS, IdeaClass, classify_idea

if TYPE_CHECKING:
    from groundloop.analysis.idea_judge import IdeaJudge

ANALYSIS_KEYS = (
    "search_id",
    "environment",
    "strategy",
    "proposer",
    "status",
    "totals",  # ideas, valid, pending, execution_rate, failures
    "baseline",  # scores, mean
    "classes",  # per class label: ideas, valid, mean_score, best_score, mean_reward
    "judge",  # None, or model, usage, classes, agreement
    "diversity",  # measure, note, mean_similarity, distinct_fraction
    "generations",  # one dict per generation, see _generation_row
    "ideas",  # one dict per idea
)


@dataclass
class _Idea:
    proposed: ev.IdeaProposed
    patch: ev.PatchReady | None = None
    patch_failed: ev.PatchFailed | None = None
    runs: dict[str, ev.RunCompleted] = field(default_factory=dict)

    @property
    def text(self) -> str:
        p = self.proposed
        return p.text if p.text.lstrip().startswith(p.title) else f"{p.title}\n\n{p.text}"

    def standing(self) -> ranking.Standing | None:
        valid = [
            (r.run_id, r.score, r.reward)
            for r in self.runs.values()
            if r.status == "succeeded" and r.score is not None
        ]
        return ranking.standing(self.proposed.idea_id, valid)  # type: ignore[arg-type]

    def outcome(self) -> str:
        """ "valid", "pending", or why the idea has no valid run."""
        if self.standing() is not None:
            return "valid"
        if self.runs:
            last = max(self.runs.values(), key=lambda r: (r.occurred_at, r.run_id))
            return f"run {last.status}"
        if self.patch_failed is not None:
            return f"patch failed ({self.patch_failed.stage})"
        return "pending"


def fold_ideas(events: Iterable[ev.Event]) -> dict[str, _Idea]:
    """The search's ideas (not the baseline) with their patch and search-split runs; a run
    recorded twice keeps its success over a loss record (as the projector does)."""
    ideas: dict[str, _Idea] = {}
    runs: list[ev.RunCompleted] = []
    patches: list[ev.Event] = []
    for e in events:
        if isinstance(e, ev.IdeaProposed) and e.mode != "baseline":
            ideas.setdefault(e.idea_id, _Idea(e))
        elif isinstance(e, ev.PatchReady | ev.PatchFailed):
            patches.append(e)
        elif isinstance(e, ev.RunCompleted) and e.purpose == "search" and e.idea_id:
            runs.append(e)
    for p in patches:
        idea = ideas.get(p.idea_id)  # type: ignore[attr-defined]
        if idea is None:
            continue
        if isinstance(p, ev.PatchReady):
            idea.patch = idea.patch or p
        elif isinstance(p, ev.PatchFailed):
            idea.patch_failed = idea.patch_failed or p
    for r in runs:
        idea = ideas.get(r.idea_id or "")
        if idea is not None:
            held = idea.runs.get(r.run_id)
            if held is None or (held.status != "succeeded" and r.status == "succeeded"):
                idea.runs[r.run_id] = r
    return ideas


def analyze_events(
    events: list[ev.Event],
    *,
    sources: Mapping[str, str] | None = None,
    knob_names: Collection[str] = (),
    diffs: Mapping[str, str] | None = None,
    measure: SimilarityMeasure | None = None,
    judge: IdeaJudge | None = None,
) -> dict[str, Any]:
    """The analysis of one search's events as plain JSON values (keys: ANALYSIS_KEYS).

    `sources`: the environment's baseline files (path -> text), to classify patches by
    syntax tree (without: by the diff's lines); `knob_names`: its declared knobs; `diffs`:
    object-store key -> diff text for patches too large to inline; `measure`: the similarity
    measure (default TF-IDF: pass `choose_measure()` for embeddings); `judge`: the LLM judge."""
    started = next((e for e in events if isinstance(e, ev.SearchStarted)), None)
    search_id = events[0].search_id if events else ""
    ideas = fold_ideas(events)
    order = sorted(ideas.values(), key=lambda i: i.proposed.generation)  # stable: log order
    measure = measure or TfidfSimilarity()
    matrix = measure.similarities([i.text for i in order])
    classes = {
        i.proposed.idea_id: classify_idea(i.proposed.knobs, _diff(i, diffs), sources, knob_names)
        for i in order
    }
    verdicts = (
        judge.classify_all([(i.proposed.idea_id, i.proposed.title, i.text) for i in order])
        if judge is not None and order
        else {}
    )
    judged = {k: v.label for k, v in verdicts.items()}
    by_gen: dict[int, list[int]] = defaultdict(list)
    for n, idea in enumerate(order):
        by_gen[idea.proposed.generation].append(n)
    generations, best = [], None
    for g in sorted(by_gen):
        row = _generation_row(g, [order[n] for n in by_gen[g]], classes, judged)
        row["mean_similarity"] = mean_pairwise(matrix, by_gen[g])
        row["diversity"] = None if row["mean_similarity"] is None else 1 - row["mean_similarity"]
        if row["best_reward"] is not None and (best is None or row["best_reward"] > best[0]):
            best = (row["best_reward"], row["best_score"])
        row["best_so_far_score"] = best[1] if best else None
        generations.append(row)
    completed = next((e for e in reversed(events) if isinstance(e, ev.SearchCompleted)), None)
    stopped = next((e for e in events if isinstance(e, ev.SearchStopped)), None)
    return {
        "search_id": search_id,
        "environment": started.environment if started else None,
        "strategy": started.strategy if started else None,
        "proposer": _proposer(started),
        "status": "completed" if completed else "stopped" if stopped else "running",
        "totals": _outcomes(order),
        "baseline": _baseline(events),
        "classes": _class_stats(order, {k: c.label for k, c in classes.items()}),
        "judge": _judge_summary(judge, order, classes, judged),
        "diversity": {
            "measure": measure.name,
            "note": measure.note,
            "mean_similarity": mean_pairwise(matrix, list(range(len(order)))),
            "distinct_fraction": distinct_fraction([i.text for i in order]),
        },
        "generations": generations,
        "ideas": [_idea_row(i, classes[i.proposed.idea_id], verdicts) for i in order],
    }


def _diff(idea: _Idea, diffs: Mapping[str, str] | None) -> str | None:
    patch = idea.patch
    if patch is None:
        return None
    if patch.diff is not None:
        return patch.diff
    return (diffs or {}).get(patch.diff_key or "")


def _outcomes(ideas: list[_Idea]) -> dict[str, Any]:
    outcomes = Counter(i.outcome() for i in ideas)
    valid, pending = outcomes.pop("valid", 0), outcomes.pop("pending", 0)
    known = len(ideas) - pending
    return {
        "ideas": len(ideas),
        "valid": valid,
        "pending": pending,
        "execution_rate": valid / known if known else None,
        "failures": dict(sorted(outcomes.items())),
    }


def _scores(ideas: list[_Idea]) -> dict[str, Any]:
    standings = [s for s in (i.standing() for i in ideas) if s is not None]
    top = min(standings, key=ranking.rank_key, default=None)
    return {
        "best_score": top.mean_score if top else None,
        "best_reward": top.mean_reward if top else None,
        "best_idea_id": top.idea_id if top else None,
        "mean_score": ranking.mean(s.mean_score for s in standings) if standings else None,
        "mean_reward": ranking.mean(s.mean_reward for s in standings) if standings else None,
    }


def _class_stats(ideas: list[_Idea], labels: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in (*CLASS_LABELS, "unclassified"):
        members = [i for i in ideas if labels.get(i.proposed.idea_id) == label]
        scores = _scores(members)
        out[label] = {
            "ideas": len(members),
            "valid": sum(1 for i in members if i.standing() is not None),
            "mean_score": scores["mean_score"],
            "best_score": scores["best_score"],
            "mean_reward": scores["mean_reward"],
        }
    return out


def _share(ideas: list[_Idea], labels: Mapping[str, str]) -> dict[str, Any]:
    counts = Counter(labels.get(i.proposed.idea_id, "unclassified") for i in ideas)
    classified = counts["hyperparameter"] + counts["algorithmic"]
    return {
        "hyperparameter": counts["hyperparameter"],
        "algorithmic": counts["algorithmic"],
        "unclassified": len(ideas) - classified,
        "hyperparameter_share": counts["hyperparameter"] / classified if classified else None,
    }


def _generation_row(
    generation: int,
    ideas: list[_Idea],
    classes: Mapping[str, IdeaClass],
    judged: Mapping[str, str],
) -> dict[str, Any]:
    labels = {k: c.label for k, c in classes.items()}
    by_class = _class_stats(ideas, labels)
    return {
        "generation": generation,
        **_outcomes(ideas),
        "patched": sum(1 for i in ideas if i.patch is not None),
        **_scores(ideas),
        "classes": _share(ideas, labels),
        "class_scores": {k: by_class[k]["mean_score"] for k in CLASS_LABELS},
        "judge_classes": _share(ideas, judged) if judged else None,
        "distinct_fraction": distinct_fraction([i.text for i in ideas]),
    }


def _judge_summary(
    judge: IdeaJudge | None,
    ideas: list[_Idea],
    classes: Mapping[str, IdeaClass],
    judged: Mapping[str, str],
) -> dict[str, Any] | None:
    if judge is None:
        return None
    both = [
        (classes[k].label, v)
        for k, v in judged.items()
        if v in CLASS_LABELS and classes[k].label in CLASS_LABELS
    ]
    return {
        "model": judge.model,
        "usage": judge.usage.model_dump(),
        "classes": _class_stats(ideas, judged),
        "compared": len(both),
        "agreement": sum(a == b for a, b in both) / len(both) if both else None,
    }


def _baseline(events: list[ev.Event]) -> dict[str, Any]:
    runs = {
        e.run_id: e
        for e in events
        if isinstance(e, ev.RunCompleted) and e.purpose == "baseline" and e.status == "succeeded"
    }
    scores = [r.score for r in sorted(runs.values(), key=lambda r: r.run_id) if r.score is not None]
    return {"scores": scores, "mean": ranking.mean(scores) if scores else None}


def _proposer(started: ev.SearchStarted | None) -> str | None:
    if started is None:
        return None
    return (
        f"{started.proposer.kind}:{started.proposer.model}"
        if started.proposer.model
        else started.proposer.kind
    )


def _idea_row(idea: _Idea, cls: IdeaClass, verdicts: Mapping[str, Any]) -> dict[str, Any]:
    p, standing = idea.proposed, idea.standing()
    verdict = verdicts.get(p.idea_id)
    return {
        "idea_id": p.idea_id,
        "generation": p.generation,
        "mode": p.mode,
        "title": p.title,
        "outcome": idea.outcome(),
        "score": standing.mean_score if standing else None,
        "reward": standing.mean_reward if standing else None,
        "runs": standing.runs if standing else 0,
        "class": cls.label,
        "class_method": cls.method,
        "class_reason": cls.reason,
        "judge_class": verdict.label if verdict else None,
        "judge_reason": verdict.reason if verdict else None,
    }
