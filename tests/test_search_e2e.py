"""`groundloop search` and the history commands end to end: a real nats-server, the real CLI
as a subprocess (every service a task of it, runs as real sandboxed subprocesses), the real
synthetic environment (and tinygpt with a tiny budget).

Most tests share one broker stream and one recorded evolution search (`evolution`), which
re-decide, fork and export read; the SIGKILL and tinygpt tests get streams of their own.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.bus import Bus
from groundloop.consumer import is_history
from groundloop.settings import Settings
from tests.paths import REPO_ROOT
from tests.waiting import eventually_sync

CLI = [sys.executable, "-m", "groundloop.cli.main"]
SYNTHETIC = REPO_ROOT / "environments" / "synthetic"
TINYGPT = REPO_ROOT / "environments" / "tinygpt"


def cli_env(settings: Settings) -> dict[str, str]:
    values = {
        "nats_url": settings.nats_url,
        "data_dir": settings.data_dir,
        "db_url": settings.db_url,
        "subject_prefix": settings.subject_prefix,
        "stream": settings.stream,
        "dlq_stream": settings.dlq_stream,
        "artifacts_bucket": settings.artifacts_bucket,
        "ack_wait_s": settings.ack_wait_s,
        "environments_dir": settings.environments_dir,
    }
    if settings.nats_credentials_dir is not None:  # log in as its role and sign, as services do
        values["nats_credentials_dir"] = settings.nats_credentials_dir
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROUNDLOOP_")}
    wide = {"COLUMNS": "250"}  # Rich wraps at the terminal width; keep each message on one line
    return {**env, **wide, **{f"GROUNDLOOP_{k.upper()}": str(v) for k, v in values.items()}}


def groundloop(settings: Settings, *args: str, timeout: float = 120) -> str:
    """Run one CLI command to completion; its output, or a failure with the output's tail
    (on a timeout, after killing its whole process group, runs included)."""
    out = settings.data_dir.parent / f"cli-{time.monotonic_ns()}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        proc = subprocess.Popen(
            [*CLI, *args],
            env=cli_env(settings),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(
                f"groundloop {' '.join(args)} ran over {timeout:.0f}s:\n{out.read_text()[-4000:]}"
            )
    text = out.read_text()
    assert proc.returncode == 0, (
        f"groundloop {' '.join(args)} exited {proc.returncode}:\n{text[-4000:]}"
    )
    return text


def search(
    settings: Settings, search_id: str, *args: str, env: str = "synthetic", timeout: float = 120
) -> Path:
    groundloop(settings, "search", "--env", env, "--search-id", search_id, *args, timeout=timeout)
    return settings.data_dir / "reports" / search_id


def log_of(settings: Settings, search_id: str) -> list[ev.Event]:
    async def read() -> list[ev.Event]:
        bus = await Bus.connect(settings, "test-reader")
        try:
            return [e async for e in bus.events(search_id)]
        finally:
            await bus.close()

    return asyncio.run(read())


def of(events: list[ev.Event], cls: type[ev.Event]) -> list:
    return [e for e in events if isinstance(e, cls)]


def settings_for(
    nats_url: str, root: Path, tag: str, environments_dir: Path | None = None
) -> Settings:
    return Settings(
        nats_url=nats_url,
        data_dir=root / "data",
        db_url=f"sqlite:///{root / 'projections.db'}",
        subject_prefix=f"e2e{tag.lower()}",
        stream=f"GL_E2E_{tag}",
        dlq_stream=f"GLDLQ_E2E_{tag}",
        artifacts_bucket=f"art_e2e_{tag.lower()}",
        ack_wait_s=2.0,
        **({"environments_dir": environments_dir} if environments_dir else {}),
    )


def assert_report(report: Path) -> None:
    for name in (
        "leaderboard.md",
        "leaderboard.csv",
        "summary.json",
        "best.patch",
        "best_so_far.png",
    ):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, f"{name} missing"
    assert (report / "best_so_far.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((report / "summary.json").read_text())["search"]["status"] == "completed"


@dataclass
class Recorded:
    settings: Settings
    report: Path
    log: list[ev.Event]


@pytest.fixture(scope="module")
def shared(nats_server, tmp_path_factory) -> Settings:
    return settings_for(nats_server.url, tmp_path_factory.mktemp("e2e"), "SHARED")


@pytest.fixture(scope="module")
def evolution(shared: Settings) -> Recorded:
    report = search(shared, "evo", "--generations", "2", "--ideas", "3", "--final-seeds", "2")
    return Recorded(shared, report, log_of(shared, "evo"))


# ---------------------------------------------------------------------------- searches


def test_evolution_completes_with_a_report_and_a_final_ci(evolution: Recorded) -> None:
    assert_report(evolution.report)
    log = evolution.log
    assert [g.generation for g in of(log, ev.GenerationAdvanced)] == [0, 1]
    plan1 = of(log, ev.GenerationAdvanced)[1].plan
    assert plan1.fresh == 0 and plan1.explore + plan1.exploit == 3  # Algorithm 1, not best-of-N
    (done,) = of(log, ev.SearchCompleted)
    assert done.reason == "completed 2 generations" and done.baseline_score is not None
    assert done.final, "no final re-evaluation"
    for final in done.final:
        assert len(final.scores) == 2
        assert final.ci95_low < final.mean < final.ci95_high
    assert "95 % CI" in (evolution.report / "leaderboard.md").read_text()


def test_best_of_n_completes_with_a_report(shared: Settings) -> None:
    report = search(shared, "bon", "--strategy", "best_of_n", "--generations", "2", "--ideas", "3")
    assert_report(report)
    log = log_of(shared, "bon")
    plans = [g.plan for g in of(log, ev.GenerationAdvanced)]
    assert [(p.fresh, p.explore, p.exploit) for p in plans] == [(3, 0, 0), (3, 0, 0)]
    assert of(log, ev.SearchCompleted)[0].reason == "completed 2 generations"


def test_a_run_budget_stops_the_search_and_says_why(shared: Settings) -> None:
    search(shared, "budget", "--generations", "5", "--ideas", "3", "--max-runs", "7")
    log = log_of(shared, "budget")
    (done,) = of(log, ev.SearchCompleted)
    # 7 runs: the final re-evaluation (best idea + baseline, on 2 seeds) is charged too, so
    # generation 0 shrinks to 2 ideas and no generation 1 opens.
    assert done.reason.startswith("budget spent: ") and "(runs: 3 of 7)" in done.reason
    measured = [r for r in of(log, ev.RunCompleted) if r.purpose != "reeval"]
    assert len(measured) == 3  # 1 baseline + generation 0 shrunk to 2 ideas
    assert len(of(log, ev.RunCompleted)) == 7  # never past the budget, re-evaluation included
    assert [g.generation for g in of(log, ev.GenerationAdvanced)] == [0]


# ---------------------------------------------------------------------------- history


def test_re_decide_reproduces_every_decision(evolution: Recorded) -> None:
    out = groundloop(evolution.settings, "replay", "re-decide", "evo")
    decisions = [e for e in evolution.log if e.producer == "evolver"]
    assert re.search(
        rf"{len(decisions)} recorded decisions, {len(decisions)} re-decided: same decisions", out
    ), out


def test_fork_from_generation_1_continues_with_best_of_n(evolution: Recorded) -> None:
    out = groundloop(
        evolution.settings,
        "replay",
        "fork",
        "evo",
        "--from-generation",
        "1",
        "--strategy",
        "best_of_n",
        "--new-id",
        "evo-fork",
    )
    assert "report in" in out
    log = log_of(evolution.settings, "evo-fork")
    copied = [e for e in log if is_history(e)]
    live = [e for e in log if not is_history(e)]
    assert isinstance(live[0], ev.SearchStarted) and live[0].forked_from == "evo"
    assert live[0].strategy == "best_of_n" and live[0].forked_generation == 1
    assert {e.generation for e in of(copied, ev.GenerationAdvanced)} == {0}
    assert [g.generation for g in of(live, ev.GenerationAdvanced)] == [1]
    assert of(live, ev.GenerationAdvanced)[0].plan.fresh == 3
    (done,) = of(live, ev.SearchCompleted)
    assert done.reason == "completed 2 generations"
    copied_patches = {p.patch_id for p in of(copied, ev.PatchReady)}
    started = of(live, ev.RunStarted)
    assert not copied_patches & {r.patch_id for r in started}, "a copied patch was run again"
    # what ran: one run per new patch, plus the final re-evaluation it requested; nothing else
    requested = {r.run_id for r in of(live, ev.RunRequested)}
    assert not [r for r in of(live, ev.RunRequested) if r.purpose == "baseline"]
    assert len(started) == len({p.patch_id for p in of(live, ev.PatchReady)}) + len(requested)
    report = evolution.settings.data_dir / "reports" / "evo-fork"
    assert_report(report)
    with (report / "leaderboard.csv").open() as fh:  # the copied generation is part of the fork
        assert sorted(int(row["generation"]) for row in csv.DictReader(fh)) == [0, 0, 0, 1, 1, 1]
    assert "same decisions" in groundloop(evolution.settings, "replay", "re-decide", "evo-fork")
    again = groundloop(
        evolution.settings,
        "replay",
        "fork",
        "evo",
        "--from-generation",
        "1",
        "--strategy",
        "best_of_n",
        "--new-id",
        "evo-fork",
    )
    assert "events of generations" not in again and [
        e.event_id for e in log_of(evolution.settings, "evo-fork")
    ] == [e.event_id for e in log]  # re-running the command finds it complete: nothing new


def test_export_then_import_round_trips(evolution: Recorded, tmp_path: Path) -> None:
    settings = evolution.settings
    first, second = tmp_path / "evo.jsonl", tmp_path / "imported.jsonl"
    groundloop(settings, "export", "evo", "--format", "paper", "-o", str(first))
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(rows) == len(of(evolution.log, ev.IdeaProposed)) == 6
    assert all(r["env"] == "synthetic" and r["ideator_model"] == "knobs" for r in rows)
    assert all(set(r["result"]) == {"score"} for r in rows if r["code_diff"])
    out = groundloop(
        settings, "import", str(first), "--env", "synthetic", "--search-id", "evo-imported"
    )
    assert "evo-imported" in out
    groundloop(settings, "export", "evo-imported", "--format", "paper", "-o", str(second))
    assert second.read_text() == first.read_text()
    imported = log_of(settings, "evo-imported")
    assert all(e.producer == "history:import" for e in imported)
    assert isinstance(imported[-1], ev.SearchStarted) and imported[-2].reason == "imported"

    # published trajectories can be forked; the services, running now, act on no imported fact
    groundloop(
        settings, "replay", "fork", "evo-imported", "--from-generation", "1", "--new-id", "imp-fork"
    )
    assert [e.event_id for e in log_of(settings, "evo-imported")] == [e.event_id for e in imported]
    fork_log = log_of(settings, "imp-fork")
    assert [g.generation for g in of(fork_log, ev.GenerationAdvanced) if not is_history(g)] == [1]
    assert of(fork_log, ev.SearchCompleted)
    with (settings.data_dir / "reports" / "imp-fork" / "leaderboard.csv").open() as fh:
        proposers = {(row["generation"], row["proposer"]) for row in csv.DictReader(fh)}
    assert ("0", "import:knobs") in proposers and ("1", "knobs") in proposers


# ---------------------------------------------------------------------------- resume


def test_resume_after_sigkill_runs_no_completed_run_again(nats_server, tmp_path: Path) -> None:
    """SIGKILL the whole CLI process group mid-generation, run the same command again: the
    search completes, and no run that had completed before the kill starts again."""
    envs = tmp_path / "envs"
    shutil.copytree(SYNTHETIC, envs / "synthetic", ignore=shutil.ignore_patterns("__pycache__"))
    config = envs / "synthetic" / "config.py"  # slower runs (a different env, its own digest)
    config.write_text(config.read_text().replace("SLEEP_SECONDS = 0.0", "SLEEP_SECONDS = 0.4"))
    settings = settings_for(nats_server.url, tmp_path, "KILL", envs)
    command = [
        *CLI,
        "search",
        "--env",
        "synthetic",
        "--search-id",
        "killed",
        "--generations",
        "2",
        "--ideas",
        "3",
    ]
    with (tmp_path / "first.log").open("w") as fh:
        first = subprocess.Popen(
            command,
            env=cli_env(settings),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def a_search_run_completed() -> bool:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            runs = of(log_of(settings, "killed"), ev.RunCompleted)
            return any(r.purpose == "search" for r in runs)

        eventually_sync(
            a_search_run_completed, timeout=90, what="a search run completing", interval=0.2
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = log_of(settings, "killed")
    assert not of(before, ev.SearchCompleted), "the search finished before the kill"
    completed = {r.run_id for r in of(before, ev.RunCompleted)}
    seen = {e.event_id for e in before}

    groundloop(settings, *command[len(CLI) :])
    after = [e for e in log_of(settings, "killed") if e.event_id not in seen]
    restarted = [r.run_id for r in of(after, ev.RunStarted) if r.run_id in completed]
    assert not restarted, f"runs completed before the kill started again: {restarted}"
    (done,) = of(after, ev.SearchCompleted)
    assert done.reason == "completed 2 generations"
    assert [g.generation for g in of(before + after, ev.GenerationAdvanced)] == [0, 1]


# ---------------------------------------------------------------------------- tinygpt


@pytest.mark.slow
def test_tinygpt_with_a_tiny_token_budget(nats_server, tmp_path: Path) -> None:
    """1 generation × 2 ideas on a copy of tinygpt whose protected data.py trains on 8 Ki
    tokens and scores 4 Ki (a different environment, with its own digest) instead of 512 Ki
    and 64 Ki; one final seed. About 7 torch processes (2 of them smoke pre-flights)."""
    envs = tmp_path / "envs"
    shutil.copytree(TINYGPT, envs / "tinygpt", ignore=shutil.ignore_patterns("__pycache__", "out"))
    data = envs / "tinygpt" / "data.py"
    text = data.read_text()
    for constant, value in (
        ("TOKEN_BUDGET", "8_192"),
        ("SMOKE_TOKENS", "2_048"),
        ("EVAL_TOKENS", "4_096"),
    ):
        text, count = re.subn(rf"^{constant} = [0-9_]+", f"{constant} = {value}", text, flags=re.M)
        assert count == 1, f"tinygpt's data.py has no {constant} constant any more"
    data.write_text(text)
    settings = settings_for(nats_server.url, tmp_path, "TINY", envs)
    report = search(
        settings,
        "tiny",
        "--generations",
        "1",
        "--ideas",
        "2",
        "--final-seeds",
        "1",
        env="tinygpt",
        timeout=420,
    )
    log = log_of(settings, "tiny")
    (done,) = of(log, ev.SearchCompleted)
    assert done.reason == "completed 1 generations", done
    baseline = [r for r in of(log, ev.RunCompleted) if r.purpose == "baseline"]
    assert baseline and all(r.status == "succeeded" and 0.3 < r.score < 6.0 for r in baseline), (
        baseline
    )
    assert len(of(log, ev.IdeaProposed)) == 2
    assert (report / "leaderboard.md").is_file() and (report / "summary.json").is_file()
