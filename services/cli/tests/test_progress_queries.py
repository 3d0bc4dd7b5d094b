"""`groundloop search`'s progress display computed by aggregate queries shows what the whole
leaderboard and every run of the search give, and its queries run off the event loop that
every role of the embedded search shares."""

from __future__ import annotations

import asyncio
import random
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlmodel import Session, func, select

from groundloop import events as ev
from groundloop.api import ranking
from groundloop.api.projector import project_all
from groundloop.api.store import IdeaRow, PatchRow, make_engine, reset_tables
from groundloop.api.usage import model_usage
from groundloop.cli.progress import progress, watch
from groundloop.settings import Settings
from tests import factories as f

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _progress_from_every_run(session: Session, search_id: str) -> list[tuple[str, str]]:
    """The display as it was computed from every run's row and the whole leaderboard."""
    ideas = session.exec(
        select(func.count()).select_from(IdeaRow).where(IdeaRow.search_id == search_id)
    ).one()
    patched = session.exec(
        select(func.count()).select_from(PatchRow).where(PatchRow.search_id == search_id)
    ).one()
    runs = ranking.search_runs(session, search_id)
    usage = model_usage(session, search_id)
    board = ranking.leaderboard(session, search_id, include_baseline=False)
    best = board[0] if board else None
    baseline = ranking.baseline_scores(runs)
    done = sum(1 for r in runs if r.completed_at is not None)
    running = sum(1 for r in runs if r.status == "running")
    return [
        ("ideas / patched", f"{ideas} / {patched}"),
        ("runs done / in flight", f"{done} / {running}"),
        ("baseline (search split)", ", ".join(f"{s:.4g}" for s in baseline) or "measuring"),
        (
            "best so far (search split)",
            f"{best.standing.mean_score:.4g} (mean of {best.standing.runs} "
            f"run{'s' if best.standing.runs != 1 else ''}; {(best.idea.title or '')[:60]})"
            if best
            else "-",
        ),
        (
            "model tokens / cost",
            f"{usage.input_tokens + usage.output_tokens:,} / ${usage.cost_usd:.4f}",
        ),
    ]


def _random_search(rng: random.Random, search_id: str) -> list[ev.Event]:
    """Ideas (some of mode baseline, some patched) with runs succeeded, failed, re-evaluated,
    still running, and the unpatched baseline's, on a metric minimised or maximised."""
    sign = rng.choice([1.0, -1.0])  # reward = -score: lower is better
    ideas = [
        f.idea_proposed(
            search_id,
            n,
            title=f"{search_id} idea {n} " + "x" * rng.randint(0, 80),
            mode=rng.choice(["fresh", "exploit", "baseline"]),
        )
        for n in range(rng.randint(0, 6))
    ]
    out: list[ev.Event] = [f.search_started(search_id), *ideas]
    out += [f.patch_ready(i) for i in ideas if rng.random() < 0.7]
    for n in range(rng.randint(0, 30)):
        idea = rng.choice([*ideas, None])
        purpose = "baseline" if idea is None else rng.choice(["search", "search", "reeval"])
        run_id = f"{search_id}-{rng.randrange(10**6):06d}-{n}"
        if rng.random() < 0.15:
            out.append(
                ev.RunStarted(
                    search_id=search_id,
                    producer="runner",
                    run_id=run_id,
                    idea_id=idea and idea.idea_id,
                    runner_id="r1",
                    host="h",
                    seed=n,
                )
            )
            continue
        status = rng.choice(["succeeded", "succeeded", "failed", "killed"])
        score = rng.choice([0.25, 0.5, 0.75, 1.5]) if status == "succeeded" else None
        completed = f.run_result(
            search_id,
            run_id,
            status=status,
            score=score,
            reward=None if score is None else sign * score,
            purpose=purpose,
            idea_id=idea and idea.idea_id,
        )
        out.append(completed.model_copy(update={"occurred_at": T0 + timedelta(rng.randint(0, 3))}))
    return out


def test_the_display_equals_the_one_from_every_run():
    rng = random.Random(7)
    shown_leaders = set()
    for _ in range(40):
        engine = make_engine("sqlite://")
        reset_tables(engine)
        project_all(engine, _random_search(rng, "s1") + _random_search(rng, "s2"))
        with Session(engine) as session:
            pairs, row = progress(session, "s1")
            assert row is not None and row.search_id == "s1"
            assert [label for label, _ in pairs[:2]] == ["search", "generation"]
            assert pairs[2:] == _progress_from_every_run(session, "s1")
            shown_leaders.add(dict(pairs)["best so far (search split)"])
        engine.dispose()
    assert "-" in shown_leaders and len(shown_leaders) > 10  # the cases did vary


async def test_watch_queries_the_runs_off_the_event_loop(tmp_path: Path, capsys: Any):
    settings = Settings(db_url=f"sqlite:///{tmp_path / 'p.db'}", data_dir=tmp_path)
    engine = make_engine(settings.resolved_db_url())
    reset_tables(engine)
    project_all(engine, f.one_search("s1", ideas=3))
    engine.dispose()
    threads: set[int] = set()

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM runs" in statement:
            threads.add(threading.get_ident())

    event.listen(Engine, "before_cursor_execute", record)
    try:
        row = await watch(settings, "s1", asyncio.Event(), [])
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert row is not None and row.status == "completed"
    assert threads and threading.get_ident() not in threads
    assert "runs done / in flight: 3 / 0" in capsys.readouterr().out
