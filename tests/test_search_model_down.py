"""`groundloop search` with its model down, as a new user meets it: the real CLI as a
subprocess (embedded services, a real nats-server, the synthetic environment) aimed at a URL on
which nothing listens. It must end fast and non-zero, name the URL and the OS error, and the
log must say why the search stopped; and choices it cannot honour are refused up front."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.settings import Settings
from tests.llm_replay_server import refused_url
from tests.test_search_e2e import cli_env, log_of

CLI = [sys.executable, "-m", "groundloop.cli.main"]
LIMIT_S = 90.0  # synthetic's baseline takes seconds; a model that is down adds none


def run_cli(settings: Settings, *args: str, timeout: float = LIMIT_S) -> tuple[int, str, float]:
    out = settings.data_dir.parent / f"cli-{time.monotonic_ns()}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    begun = time.monotonic()
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
            pytest.fail(f"groundloop {' '.join(args)} ran over {timeout:.0f}s:\n{out.read_text()}")
    return proc.returncode, out.read_text(), time.monotonic() - begun


def test_a_search_whose_model_is_down_exits_non_zero_naming_the_url_and_the_os_error(
    settings: Settings,
) -> None:
    url = refused_url()
    code, text, took = run_cli(
        settings,
        "search",
        "--env",
        "synthetic",
        "--search-id",
        "down",
        "--model",
        f"openai-compatible:x@{url}",
        "--generations",
        "2",
        "--ideas",
        "2",
        "--deadline",
        "30",
    )
    flat = " ".join(text.split())  # Rich may wrap a long message
    assert code == 1, text
    assert "search down stopped by the ideator, LLMUnreachable" in flat, text
    assert url in flat and "refused" in flat.lower(), text
    assert "done" not in flat.split("stopped")[-1]  # no report claimed
    assert took < LIMIT_S
    log = log_of(settings, "down")
    (stopped,) = [e for e in log if isinstance(e, ev.SearchStopped)]
    assert stopped.stage == "ideator" and stopped.error_type == "LLMUnreachable"
    assert not [e for e in log if isinstance(e, ev.SearchCompleted)]
    assert not [e for e in log if isinstance(e, ev.IdeaProposed) and e.mode != "baseline"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--strategy", "random"), "valid values: evolution, best_of_n, rl, hybrid"),
        (("--strategy", "evolution", "--rl-policy", "hf:/x"), "apply to --strategy rl or hybrid"),
        (("--edit-format", "patch"), "valid values: diff, search-replace, whole-file"),
    ],
)
def test_choices_it_cannot_honour_are_refused_before_anything_starts(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    settings = Settings(data_dir=tmp_path / "data", nats_url="nats://127.0.0.1:1")
    code, text, took = run_cli(settings, "search", "--env", "synthetic", *args, timeout=60)
    assert code == 2, text
    assert message in " ".join(text.split()), text
    assert not (tmp_path / "data" / "reports").exists()


def test_help_notes_the_papers_values(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", nats_url="nats://127.0.0.1:1")
    code, text, _ = run_cli(settings, "search", "--help", timeout=60)
    flat = " ".join(text.split())
    assert code == 0, text
    for flag in (
        "--samples",
        "--revisions",
        "--ideas-per-call",
        "--edit-format",
        "--model-concurrency",
        "--max-output-tokens",
    ):
        assert flag in flat, flag
    assert "paper: 10" in flat and "paper: <= 2" in flat
