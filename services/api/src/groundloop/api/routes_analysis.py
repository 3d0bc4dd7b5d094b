"""The analyses of `groundloop analyze` as JSON, for the dashboard's analysis panels: execution
rate and failure reasons per generation, hyper-parameter vs algorithmic share and score per
class, diversity per generation, best and mean score per generation; several searches side
by side.

Computed from the log, not the projections, by the same library the CLI uses
(groundloop.analysis.from_log): it folds events, classifies patches against the environment's
files when they are installed here, and fetches large diffs from the object store. So these
routes need the broker (503 without one, like the live feed). No LLM judge is run here (that
costs money per idea: `groundloop analyze --judge-model` asks one); `judge` is always null.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request
from nats.js.errors import NotFoundError
from pydantic import BaseModel, ConfigDict, Field

from groundloop.analysis.diversity import DiversityError, SimilarityMeasure, choose_measure
from groundloop.analysis.from_log import analyze_logged
from groundloop.api.routes_control import unprocessable
from groundloop.bus import Bus
from groundloop.events import SEARCH_ID_PATTERN, is_valid_search_id

router = APIRouter(tags=["analysis"])

CACHED_ANALYSES = 64  # (search, measure) pairs kept, least recently asked dropped first
MAX_SEARCHES = 12  # side by side: more would not fit a page, and each reads its whole log
Measure = Literal["auto", "tfidf", "wordllama"]


class Outcomes(BaseModel):
    ideas: int
    valid: int  # ideas with a succeeded search-split run with a score
    pending: int  # waiting for a patch or a run: not counted as failures
    execution_rate: float | None  # valid / (ideas - pending)
    failures: dict[str, int]  # why ideas have no valid run -> how many


class Baseline(BaseModel):
    scores: list[float]
    mean: float | None


class ClassStats(BaseModel):
    ideas: int
    valid: int
    mean_score: float | None
    best_score: float | None
    mean_reward: float | None


class ClassShare(BaseModel):
    hyperparameter: int
    algorithmic: int
    unclassified: int
    hyperparameter_share: float | None  # of the classified ideas


class Diversity(BaseModel):
    measure: str
    note: str
    mean_similarity: float | None
    distinct_fraction: float | None


class MetricName(BaseModel):
    name: str
    direction: Literal["minimize", "maximize"]


class GenerationAnalysis(Outcomes):
    generation: int
    patched: int
    best_score: float | None  # the idea with the highest mean reward
    best_reward: float | None
    best_idea_id: str | None
    mean_score: float | None  # over the generation's ideas with a valid run
    mean_reward: float | None
    classes: ClassShare
    class_scores: dict[str, float | None]  # class -> mean score of its ideas
    judge_classes: ClassShare | None
    distinct_fraction: float | None
    mean_similarity: float | None
    diversity: float | None  # 1 - mean_similarity
    best_so_far_score: float | None


class IdeaAnalysis(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    idea_id: str
    generation: int
    mode: str
    title: str
    outcome: str  # "valid", "pending", or why it has no valid run
    score: float | None
    reward: float | None
    runs: int
    class_: str = Field(alias="class")  # hyperparameter / algorithmic / unclassified
    class_method: str
    class_reason: str
    judge_class: str | None
    judge_reason: str | None


class SearchAnalysis(BaseModel):
    """One search: the dict `groundloop analyze` writes to analysis.json."""

    search_id: str
    environment: str | None
    strategy: str | None
    proposer: str | None
    status: Literal["running", "stopped", "completed"]
    metric: MetricName | None  # from the manifest, when the environment is installed here
    class_basis: str  # what patches were classified by
    totals: Outcomes
    baseline: Baseline
    classes: dict[str, ClassStats]
    judge: dict[str, Any] | None
    diversity: Diversity
    generations: list[GenerationAnalysis]
    ideas: list[IdeaAnalysis]


MeasureQuery = Annotated[
    Measure,
    Query(
        description="idea similarity: auto (WordLlama when installed, else TF-IDF, as "
        "`groundloop analyze` chooses), tfidf, or wordllama"
    ),
]
NEEDS_BROKER: dict[int | str, dict[str, Any]] = {
    404: {"description": "the log has no event of this search"},
    503: {"description": "no broker configured or reachable"},
}


async def _measure(request: Request, spec: Measure) -> SimilarityMeasure:
    """The measure, loaded once per app (WordLlama takes most of a second to load)."""
    cache: dict[str, SimilarityMeasure] = request.app.state.analysis_measures
    if spec not in cache:
        try:
            cache[spec] = await asyncio.to_thread(choose_measure, spec)
        except DiversityError as exc:
            raise unprocessable(("query", "measure"), str(exc)) from None
    return cache[spec]


async def _last_seq(bus: Bus, search_id: str) -> int | None:
    """The stream sequence of the search's last entry, read without a consumer; None: the log
    has nothing of it."""
    try:
        msg = await bus.js.get_last_msg(
            bus.settings.stream, bus.subject_filter(search_id=search_id)
        )
    except NotFoundError:
        return None
    return msg.seq


async def _analysis(request: Request, search_id: str, measure: Measure) -> SearchAnalysis:
    """Computed once per state of the log: a page that asks again while nothing new was
    recorded for the search gets the cached answer, and the log is not read again (each read
    holds an ephemeral consumer on the broker for a while)."""
    bus = await request.app.state.broker.bus()
    seq = await _last_seq(bus, search_id)
    if seq is None:
        raise HTTPException(status_code=404, detail=f"no events of search {search_id!r} in the log")
    cache: OrderedDict[tuple[str, str], tuple[int, SearchAnalysis]] = (
        request.app.state.analysis_cache
    )
    held = cache.get((search_id, measure))
    if held is not None and held[0] == seq:
        cache.move_to_end((search_id, measure))
        return held[1]
    chosen = await _measure(request, measure)
    result = await analyze_logged(bus, request.app.state.settings, search_id, measure=chosen)
    if result is None:  # emptied meanwhile (a test's stream, a purge)
        raise HTTPException(status_code=404, detail=f"no events of search {search_id!r} in the log")
    analysis = SearchAnalysis.model_validate(result)
    cache[(search_id, measure)] = (seq, analysis)
    while len(cache) > CACHED_ANALYSES:
        cache.popitem(last=False)
    return analysis


@router.get(
    "/searches/{search_id}/analysis",
    response_model=SearchAnalysis,
    response_model_by_alias=True,
    responses=NEEDS_BROKER,
)
async def search_analysis(
    search_id: Annotated[str, Path(pattern=SEARCH_ID_PATTERN)],
    request: Request,
    measure: MeasureQuery = "auto",
) -> SearchAnalysis:
    """What `groundloop analyze SEARCH` writes, per generation: execution rate and failure
    reasons, hyper-parameter vs algorithmic ideas (share, and score per class), diversity,
    best and mean score; read from the log (live, finished, forked or imported searches)."""
    return await _analysis(request, search_id, measure)


@router.get(
    "/analysis",
    response_model=list[SearchAnalysis],
    response_model_by_alias=True,
    responses=NEEDS_BROKER,
)
async def analyses(
    request: Request,
    ids: Annotated[
        str,
        Query(
            min_length=1,
            description=f"comma-separated search ids, at most {MAX_SEARCHES}, side by side",
        ),
    ],
    measure: MeasureQuery = "auto",
) -> list[SearchAnalysis]:
    """Several searches' analyses in the order asked (`groundloop analyze A B …`), with one
    similarity measure for all, so their diversity compares."""
    wanted = list(dict.fromkeys(i.strip() for i in ids.split(",") if i.strip()))
    bad = [i for i in wanted if not is_valid_search_id(i)]
    if not wanted or bad:
        raise unprocessable(
            ("query", "ids"),
            f"expected comma-separated search ids ({SEARCH_ID_PATTERN}), got {ids!r}",
        )
    if len(wanted) > MAX_SEARCHES:
        raise unprocessable(("query", "ids"), f"at most {MAX_SEARCHES} searches, got {len(wanted)}")
    return [await _analysis(request, search_id, measure) for search_id in wanted]
