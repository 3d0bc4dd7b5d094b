"""Services as separate processes on a real broker, for the tests (and benchmarks) that run
roles the way a deployment does: `python -m groundloop.<role>`, one process each.

- `settings_for`: settings on a test's nats-server or cluster with names of their own (subject
  prefix, streams, bucket), the broker granting the roles their permissions on those names;
- `service_env`: those settings as the GROUNDLOOP_* variables of a subprocess (each process
  logs in as its role with the broker's credentials);
- `Fleet`: the processes, started, killed, restarted and stopped by (role, slot), each with a
  log file of its own, and the tails of those logs for a failure message;
- `resident_kb`, `memory_summary`: the processes' resident memory and its trend over a soak
  (a leak grows window after window);
- `projected_event_ids`: what the projector processes have projected, to wait for them;
- `exactly_once_failures`: what a log of searches breaks of exactly-once (lost or repeated
  patches and runs, event ids stored twice).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import SecretStr

from groundloop import events as ev
from groundloop.api.store import make_engine
from groundloop.permissions import Names
from groundloop.settings import Settings


class Broker(Protocol):
    """A test's nats-server (`NatsServer`) or cluster (`NatsCluster`)."""

    @property
    def url(self) -> str: ...

    @property
    def credentials(self) -> Path | None: ...

    def serve(self, names: Names) -> None: ...


def settings_for(broker: Broker, root: Path, tag: str, **overrides: Any) -> Settings:
    """Settings on `broker` with names of their own, made from `tag` (subject prefix, log,
    dead-letter stream, artifact bucket), data and projections under `root`, and `overrides`.
    The broker grants the roles their permissions on these names."""
    settings = Settings(
        nats_url=broker.url,
        nats_credentials_dir=broker.credentials,
        data_dir=root / "data",
        db_url=f"sqlite:///{root / 'projections.db'}",
        subject_prefix=tag.lower(),
        stream=f"GL_{tag.upper()}",
        dlq_stream=f"GLDLQ_{tag.upper()}",
        artifacts_bucket=f"art_{tag.lower()}",
        **overrides,
    )
    broker.serve(Names.of(settings))
    return settings


def service_env(settings: Settings, **overrides: object) -> dict[str, str]:
    """This process's environment without its own GROUNDLOOP_* and OTEL_* variables, plus every
    setting of `settings` (then `overrides`) as a GROUNDLOOP_* variable: a subprocess reads
    exactly the test's settings, whatever the shell that ran the test had set."""
    values: dict[str, object] = {**settings.model_dump(), **overrides}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GROUNDLOOP_", "OTEL_"))}
    for name, value in values.items():
        if value is not None:
            shown = value.get_secret_value() if isinstance(value, SecretStr) else value
            env[f"GROUNDLOOP_{name.upper()}"] = str(shown)
    return env


@dataclass
class Fleet:
    """The service processes of one test: `commands[role]` (the interpreter's arguments) run
    as any number of slots per role. Every start of a slot is an incarnation of its own, named
    `<role>-<slot>-<n>`: its log file under `logs`, and a runner's id (unless its arguments
    name one), so a restarted runner is a runner of its own in the log. Each process leads a
    process group of its own, so a kill takes a runner's runs with it."""

    settings: Settings
    logs: Path
    commands: dict[str, list[str]]
    overrides: dict[str, object] = field(default_factory=dict)  # settings of every process
    procs: dict[tuple[str, int], subprocess.Popen] = field(default_factory=dict)
    names: dict[tuple[str, int], str] = field(default_factory=dict)
    starts: int = 0

    def start_all(self, replicas: dict[str, int]) -> None:
        """`replicas[role]` processes of each role."""
        for role, count in replicas.items():
            for slot in range(count):
                self.start(role, slot)

    def start(
        self,
        role: str,
        slot: int = 0,
        *,
        args: list[str] | None = None,
        overrides: dict[str, object] | None = None,
    ) -> subprocess.Popen:
        """Start (or start again) `role`'s `slot`, with `args` after its command and
        `overrides` on top of the fleet's settings."""
        self.starts += 1
        name = f"{role}-{slot}-{self.starts}"
        self.logs.mkdir(parents=True, exist_ok=True)
        env = service_env(self.settings, **{**self.overrides, **(overrides or {})})
        env["GROUNDLOOP_RUNNER_RUNNER_ID"] = name  # read by runners only; a flag overrides it
        with (self.logs / f"{name}.log").open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, *self.commands[role], *(args or [])],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[role, slot], self.names[role, slot] = proc, name
        return proc

    def kill(self, role: str, slot: int = 0) -> None:
        """SIGKILL the slot's process group: no goodbye, its runs die with it."""
        proc = self.procs[role, slot]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self, timeout: float = 20.0) -> list[str]:
        """SIGTERM every process (each finishes or hands back its work and exits), wait up to
        `timeout` s for each, SIGKILL the groups of those still running. Returns the names of
        those that had to be killed."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        ignored = []
        for key, proc in self.procs.items():
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                ignored.append(self.names[key])
        return ignored

    def pids(self) -> dict[str, int]:
        """The running incarnations' process ids, by name."""
        return {self.names[k]: p.pid for k, p in self.procs.items() if p.poll() is None}

    def resident_kb(self) -> dict[str, int]:
        """The running incarnations' resident memory (VmRSS), in kB, by name."""
        return resident_kb(self.pids())

    def exited(self) -> dict[str, int]:
        """The current incarnations that have ended, with their exit status."""
        return {
            self.names[k]: code for k, p in self.procs.items() if (code := p.poll()) is not None
        }

    def log_of(self, role: str, slot: int = 0) -> Path:
        """The current incarnation's log file."""
        return self.logs / f"{self.names[role, slot]}.log"

    def tails(self, size: int = 1200) -> str:
        """The last `size` characters of every incarnation's log, for a failure message."""
        if not self.logs.is_dir():
            return ""
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-size:]}"
            for path in sorted(self.logs.iterdir())
        )


def resident_kb(pids: dict[str, int]) -> dict[str, int]:
    """The resident memory (VmRSS, from /proc) in kB of each named process still there."""
    out = {}
    for name, pid in pids.items():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # ended since
            continue
        rss = [line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")]
        if rss:  # a zombie has none
            out[name] = int(rss[0])
    return out


def memory_summary(samples: list[tuple[float, str, int]], warm_s: float, end_s: float) -> dict:
    """Per process (kB): its first sample; the trend, the median of each window (a minute,
    or a third of the span if shorter) from `warm_s` to `end_s`, windows counted back from
    `end_s` (a leak grows window after window, a warming cache levels off); its first and
    last window (start, end) and the growth between them; the peak."""
    window = min(60.0, max(end_s - warm_s, 0.0) / 3)
    count = int((end_s - warm_s) / window + 1e-9) if window > 0 else 0
    out = {}
    for name in dict.fromkeys(n for _, n, _ in samples):
        series = [(t, kb) for t, n, kb in samples if n == name]
        trend = []
        for k in reversed(range(count)):
            low = end_s - (k + 1) * window
            if in_window := [kb for t, kb in series if low <= t < low + window]:
                trend.append(statistics.median(in_window))
        trend = trend or [series[-1][1]]  # too short a soak for a window: the last sample
        out[name] = {
            "first": series[0][1],
            "start": trend[0],
            "end": trend[-1],
            "growth": trend[-1] / trend[0] - 1,
            "peak": max(kb for _, kb in series),
            "trend": trend,
        }
    return out


def projected_event_ids(settings: Settings) -> set[str]:
    """The events the projector (any replica) has recorded as projected: its tracking table."""
    engine = make_engine(settings.resolved_db_url())
    try:
        with engine.connect() as conn:
            return {row[0] for row in conn.exec_driver_sql("SELECT event_id FROM processed_events")}
    finally:
        engine.dispose()


def exactly_once_failures(log: list[ev.Event], search_ids: set[str]) -> list[str]:
    """What the log breaks of exactly-once: event ids stored twice, and per search (see
    `search_failures`)."""
    twice = sorted(i for i, n in Counter(e.event_id for e in log).items() if n > 1)
    failures = [f"event ids stored twice ({len(twice)}): {twice[:5]}"] if twice else []
    by_search: dict[str, list[ev.Event]] = defaultdict(list)
    for event in log:
        by_search[event.search_id].append(event)
    for search_id in sorted(search_ids):
        failures += [f"{search_id}: {f}" for f in search_failures(by_search[search_id])]
    return failures


def search_failures(log: list[ev.Event]) -> list[str]:
    """One search's losses and duplicates: an idea without exactly one PatchReady or
    PatchFailed, a patch without exactly one search RunCompleted, a requested run without
    exactly one RunCompleted, a run completed twice, not exactly one SearchCompleted."""

    def of(cls: type[ev.Event]) -> list:
        return [e for e in log if isinstance(e, cls)]

    failures = []
    ideas = Counter(i.idea_id for i in of(ev.IdeaProposed))
    outcomes = Counter(e.idea_id for e in of(ev.PatchReady) + of(ev.PatchFailed))
    patches = Counter(p.patch_id for p in of(ev.PatchReady))
    searched = Counter(r.patch_id for r in of(ev.RunCompleted) if r.purpose == "search")
    completed = Counter(r.run_id for r in of(ev.RunCompleted))
    requested = Counter(r.run_id for r in of(ev.RunRequested))
    for what, expected, got in (
        ("ideas implemented", ideas, outcomes),
        ("patches run", patches, searched),
        ("requested runs completed", requested, completed & requested),
    ):
        if got != expected:
            lost, extra = sorted(expected - got), sorted(got - expected)
            failures.append(f"{what}: lost {lost}, more than once or unasked {extra}")
    twice = sorted(run for run, n in completed.items() if n > 1)
    if twice:
        failures.append(f"runs completed twice: {twice}")
    if len(of(ev.SearchCompleted)) != 1:
        failures.append(f"{len(of(ev.SearchCompleted))} SearchCompleted")
    return failures


def decisions(log: list[ev.Event]) -> dict[str, object]:
    """What the roles decided, without times, causes and which process or replica decided
    it: two runs of the same search compare equal here when they decided the same."""

    def of(cls: type[ev.Event]) -> list:
        return [e for e in log if isinstance(e, cls)]

    [done] = of(ev.SearchCompleted)
    return {
        "generations": [
            (g.generation, g.plan, g.previous, g.best_so_far) for g in of(ev.GenerationAdvanced)
        ],
        "ideas": sorted(
            (i.idea_id, i.generation, i.mode, i.proposer.kind, str(i.knobs), i.text)
            for i in of(ev.IdeaProposed)
        ),
        "runs requested": sorted(
            (r.run_id, r.purpose, r.seed, str(r.idea_id)) for r in of(ev.RunRequested)
        ),
        "results": sorted({(r.run_id, r.status, r.score) for r in of(ev.RunCompleted)}, key=str),
        "policy steps": sorted(
            (u.step, u.checkpoint_digest, tuple(u.rewards)) for u in of(ev.PolicyUpdated)
        ),
        "completed": (done.best_idea_id, done.best_score, done.reason, done.final),
    }


def log_in_data_dir(data_dir: Path, search_id: str) -> list[ev.Event]:
    """A finished search's log, read from its data dir's embedded broker (started again)."""
    import asyncio

    from groundloop.broker import EmbeddedBroker, free_port
    from groundloop.bus import Bus

    settings = Settings(data_dir=data_dir)
    with EmbeddedBroker(data_dir, free_port(), names=Names.of(settings)) as broker:
        live = settings.model_copy(update={"nats_url": broker.url})

        async def read() -> list[ev.Event]:
            bus = await Bus.connect(live, "t")
            try:
                return [e async for e in bus.events(search_id)]
            finally:
                await bus.close()

        return asyncio.run(read())
