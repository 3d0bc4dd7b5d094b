"""`groundloop search --role-processes`: the roles as child processes of the CLI.

The CLI runs as a user runs it (a subprocess, its own embedded nats-server under the data
dir, so the role processes find the broker's credentials and log in as their roles) on the
synthetic environment. A search with role processes decides what the in-process search
decides for the same seed; a killed role process ends the search with an error naming it;
no role process outlives the CLI, whether it ends, is stopped or is SIGKILLed itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.broker import EmbeddedBroker, free_port
from groundloop.cli.embedded_roles import ROLE_PROCESSES, SEARCH_ROLES
from groundloop.execution.environment import Environment
from groundloop.permissions import Names
from groundloop.settings import Settings
from tests import factories
from tests.fleet import decisions, log_in_data_dir
from tests.paths import ENVIRONMENTS

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-m", "groundloop.cli.main"]
APART = [role for role in SEARCH_ROLES if role in ROLE_PROCESSES and role != "rl-trainer"]
ROLE_CHILD = b"groundloop.cli.role_child"
SEARCH = ["search", "--env", "synthetic", "--no-ui", "--deadline", "600"]


def cli_env(data_dir: Path) -> dict[str, str]:
    """This test's data dir and the checkout's environments; no broker URL: the CLI starts
    its own embedded nats-server."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("GROUNDLOOP_", "OTEL_"))}
    return {
        **inherited,
        "GROUNDLOOP_DATA_DIR": str(data_dir),
        "GROUNDLOOP_ENVIRONMENTS_DIR": str(ENVIRONMENTS),
        "COLUMNS": "250",  # Rich wraps at the terminal width; keep each message on one line
    }


def start_cli(data_dir: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    data_dir.mkdir(parents=True, exist_ok=True)
    out = data_dir.parent / f"cli-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(
        [*CLI, *args],
        env=cli_env(data_dir),
        stdout=out.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own group: the clean-up below reaches all of it
    )
    return proc, out


def finish(proc: subprocess.Popen, out: Path, timeout: float = 90) -> str:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the CLI ran over {timeout:.0f}s:\n{out.read_text()[-4000:]}")
    return out.read_text()


def run_cli(data_dir: Path, *args: str) -> str:
    proc, out = start_cli(data_dir, *args)
    text = finish(proc, out)
    assert proc.returncode == 0, f"groundloop {' '.join(args)} exited {proc.returncode}:\n{text}"
    return text


def stop_broker(data_dir: Path) -> None:
    """Stop the embedded nats-server a SIGKILLed CLI left behind (a later CLI would reuse it)."""
    import json

    info = data_dir / "nats" / "broker.json"
    if info.exists():
        try:
            os.kill(json.loads(info.read_text())["pid"], signal.SIGTERM)
        except (ProcessLookupError, ValueError, KeyError):
            pass


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from the state on; None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has finished running


def role_children(parent: int) -> dict[str, int]:
    """The role processes of the CLI `parent`: the role's module -> its pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None or fields[1] != str(parent):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if ROLE_CHILD in argv:
            found[argv[argv.index(ROLE_CHILD) + 1].decode()] = int(entry.name)
    return found


def wait_for_roles(proc: subprocess.Popen, out: Path, logs: Path) -> dict[str, int]:
    """The CLI's role processes (ROLE_PROCESSES), once each is serving (its log in `logs`
    says so)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the CLI exited early:\n{out.read_text()[-4000:]}"
        children = role_children(proc.pid)
        serving = [p for p in logs.glob("*.log") if "consuming" in p.read_text()]
        if len(children) == len(serving) == len(APART):
            return children
        time.sleep(0.2)
    pytest.fail(f"not {len(APART)} serving role processes after 60 s: {role_children(proc.pid)}")


SHAPE = ["--generations", "2", "--ideas", "3", "--final-seeds", "1", "--search-id", "rp"]


@pytest.fixture(scope="module")
def in_process_decisions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    data = tmp_path_factory.mktemp("in-process") / "data"
    text = run_cli(data, *SEARCH, *SHAPE, "--no-role-processes")
    assert "role processes:" not in text
    return decisions(log_in_data_dir(data, "rp"))


def test_role_processes_decide_what_the_in_process_roles_decide(
    in_process_decisions: dict[str, object], tmp_path: Path
):
    data = tmp_path / "data"
    text = run_cli(data, *SEARCH, *SHAPE, "--role-processes")
    assert f"role processes: {', '.join(APART)}" in text
    assert_same_decisions(log_in_data_dir(data, "rp"), in_process_decisions)
    for role in APART:
        log = data / "searches" / "rp" / f"{role}.log"
        assert "consuming" in log.read_text(), f"{role}.log says nothing"


def test_every_role_as_a_process_decides_what_the_in_process_roles_decide(
    in_process_decisions: dict[str, object], tmp_path: Path
):
    """What benchmarks/pipeline.py --role-processes projector,evolver,... runs: run_search
    with every role a child process (of this test's process), each started through its
    own entry point with the search's settings."""
    from groundloop.cli.search_job import default_slots, run_search

    settings = Settings(data_dir=tmp_path / "data", environments_dir=ENVIRONMENTS)
    env = Environment.load("synthetic", ENVIRONMENTS)
    # As the CLI builds it for SEARCH + SHAPE.
    started = factories.requested_search(env, "rp")

    async def search(live: Settings) -> None:
        report = await run_search(
            live,
            started,
            env,
            slots=default_slots(env),
            report_dir=tmp_path / "reports",
            role_processes=SEARCH_ROLES,
        )
        assert report is not None and (report / "leaderboard.md").is_file()

    with EmbeddedBroker(settings.data_dir, free_port(), names=Names.of(settings)) as broker:
        asyncio.run(search(settings.model_copy(update={"nats_url": broker.url})))
    assert_same_decisions(log_in_data_dir(settings.data_dir, "rp"), in_process_decisions)
    for role in ("projector", "evolver", "ideator", "implementer", "runner"):
        log = settings.data_dir / "searches" / "rp" / f"{role}.log"
        assert "consuming" in log.read_text(), f"{role}.log says nothing"


def assert_same_decisions(log: list[ev.Event], expected: dict[str, object]) -> None:
    ids = [e.event_id for e in log]
    assert len(ids) == len(set(ids)), "an event id twice in the log"
    # Each role logged in as itself and signed its events (verified by every reader).
    assert {e.producer for e in log} >= {"evolver", "ideator", "implementer", "runner"}
    got = decisions(log)
    for what, value in expected.items():
        assert got[what] == value, f"{what} differ from the in-process search's"


def test_a_killed_role_process_ends_the_search_with_its_name_and_log(tmp_path: Path):
    data = tmp_path / "data"
    proc, out = start_cli(data, *SEARCH, "--generations", "5", "--role-processes")
    try:
        children = wait_for_roles(proc, out, data / "searches" / "synthetic-evolution-s0")
        os.kill(children["groundloop.implementer"], signal.SIGKILL)
        text = finish(proc, out)
    finally:
        stop_broker(data)
    assert proc.returncode == 1, text
    assert "the implementer process" in text and "killed by SIGKILL" in text, text
    assert str(data / "searches" / "synthetic-evolution-s0" / "implementer.log") in text
    assert "groundloop.implementer" in text, "the tail of its log is not shown"
    survivors = [m for m, pid in children.items() if alive(pid)]
    assert not survivors, f"role processes outlived the CLI: {survivors}"


@pytest.mark.parametrize("signal_", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_no_role_process_outlives_the_cli(signal_: signal.Signals, tmp_path: Path):
    """SIGTERM: the CLI stops its roles and reaps them before it exits. SIGKILL (nothing in
    the CLI runs): the kernel tells each role its parent died, and each stops by itself."""
    data = tmp_path / "data"
    proc, out = start_cli(data, *SEARCH, "--generations", "50", "--role-processes")
    children: dict[str, int] = {}
    try:
        children = wait_for_roles(proc, out, data / "searches" / "synthetic-evolution-s0")
        os.kill(proc.pid, signal_)  # the CLI alone, not its process group
        text = finish(proc, out)
        if signal_ == signal.SIGTERM:
            assert proc.returncode == 0, text
            assert "stopped; run the same command again to resume" in text
            assert not [m for m, pid in children.items() if alive(pid)], "not reaped by the CLI"
        deadline = time.monotonic() + 45  # a runner may take its shutdown grace
        while (survivors := [m for m, pid in children.items() if alive(pid)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert not survivors, f"role processes outlived the CLI: {survivors}"
    finally:
        stop_broker(data)
        for pid in children.values():  # only if the test failed above
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_role_process_environment_rebuilds_the_search_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Settings and LLMSettings read back from the variables a role process gets equal the
    objects the search holds: set fields, secrets, JSON fields (prices), and fields that are
    unset in the search although this process's environment sets them."""
    from pydantic import SecretStr

    from groundloop.cli.role_processes import role_environment
    from groundloop.llm.client import LLMSettings

    settings = Settings(
        nats_url="nats://127.0.0.1:4999",
        nats_credentials_dir=tmp_path / "credentials",
        data_dir=tmp_path / "data",
        db_url=f"sqlite:///{tmp_path / 'p.db'}",
        environments_dir=tmp_path / "envs",
        verify_events=False,
        subject_prefix="rp",
        ack_wait_s=2.5,
        traces="console",
        api_token=SecretStr("token"),
        log_json=True,
    )
    llm = LLMSettings(
        openai_api_key=SecretStr("the search's key"),
        compatible_base_url="http://127.0.0.1:9/v1",
        max_concurrency=3,
        max_output_tokens=1000,
        temperature=0.25,
        prices={"openai:x": ev.ModelPrice(input_per_mtok=1.5, output_per_mtok=2.0)},
    )
    inherited = {
        "PATH": os.environ.get("PATH", ""),
        "OPENAI_API_KEY": "a stale key",  # an alias LLMSettings reads first
        "GROUNDLOOP_DB_URL": "sqlite:///elsewhere.db",
        "GROUNDLOOP_OTLP_ENDPOINT": "http://stale:4318",  # unset in the search's settings
        "GROUNDLOOP_LLM_THINKING_BUDGET": "99",
    }
    env = role_environment(settings, llm, inherited)
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings
    assert LLMSettings() == llm
    assert env["GROUNDLOOP_SEARCH_PID"] == str(os.getpid())
