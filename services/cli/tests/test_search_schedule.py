"""`groundloop search --schedule`, as a user runs it (a subprocess with its own embedded
nats-server): the schedule is recorded in SearchStarted; a value that is not a schedule, and
steady with a strategy that cannot overlap generations, are refused with exit 2 before
anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from groundloop import events as ev
from tests.fleet import log_in_data_dir
from tests.paths import ENVIRONMENTS

pytestmark = pytest.mark.timeout(120)


def search(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GROUNDLOOP_", "OTEL_"))}
    env |= {
        "GROUNDLOOP_DATA_DIR": str(data_dir),
        "GROUNDLOOP_ENVIRONMENTS_DIR": str(ENVIRONMENTS),
        "COLUMNS": "250",  # Rich wraps at the terminal width; keep each message on one line
    }
    return subprocess.run(
        [sys.executable, "-m", "groundloop.cli.main", "search", "--env", "synthetic", "--no-ui"]
        + list(args),
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )


def search_started(data_dir: Path, search_id: str) -> ev.SearchStarted:
    log = log_in_data_dir(data_dir, search_id)
    return next(e for e in log if isinstance(e, ev.SearchStarted))


def test_the_schedule_is_recorded_in_search_started(tmp_path: Path):
    args = ["--generations", "1", "--ideas", "2", "--final-seeds", "1", "--search-id", "st"]
    done = search(tmp_path / "data", *args, "--schedule", "steady")
    assert done.returncode == 0, done.stdout + done.stderr
    assert search_started(tmp_path / "data", "st").config.schedule == "steady"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--schedule", "rolling"],
            "--schedule 'rolling' is not valid; valid values: generational, steady",
        ),
        (
            ["--schedule", "steady", "--strategy", "best_of_n"],
            "schedule 'steady' overlaps generations, which only the evolution strategy can do",
        ),
    ],
    ids=["unknown", "steady-best-of-n"],
)
def test_a_schedule_the_search_cannot_follow_is_refused(
    args: list[str], message: str, tmp_path: Path
):
    done = search(tmp_path / "data", *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stdout
    assert not (tmp_path / "data" / "nats").exists(), "a broker was started before the refusal"
