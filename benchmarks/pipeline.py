"""Whole-pipeline throughput on this machine: ideator -> implementer (with pre-flight) ->
runner -> evolver -> projector, as `groundloop search` runs them (every service a task of this
process, or with --role-processes some of them child processes, talking through its own
embedded nats-server; the CLI's progress display polling the projection), on a copy of the
`synthetic` environment. Prints numbers; asserts nothing.

    .venv/bin/python benchmarks/pipeline.py [--proposer llm|knobs] [--candidates 1000]
        [--ideas-per-generation 50] [--slots 8] [--eval-seconds 0] [--samples 1]
        [--role-processes on|off|ROLE,ROLE...] [--schedule generational|steady]

- proposer "llm": the ideator and the implementer call a scripted OpenAI-compatible model
  (benchmarks/scripted_model.py) served on this machine (tests/llm_server.py; answers are
  instant): the ideator gets `ideas_per_call` distinct ideas per call, the implementer a
  unified diff that sets the learning rate the idea names. "knobs": the offline knob proposer, no model.
- every candidate is one idea patched, pre-flighted and run to a result in the sandbox;
  `--eval-seconds` sets the run time (SLEEP_SECONDS in the copy's config.py; smoke runs
  skip the sleep, as in the real environment).

Measured: launch (SearchStarted published) -> first candidate's RunCompleted; candidates per
second over all of them and over the first and the last 200 (goal: >= 30/s with no-op runs,
the last 200 at >= 90 % of the first 200's rate); slot utilisation = sum of every run's
wall seconds / (slots x span from the first RunStarted to the last RunCompleted) (goal with
1-s runs on 8 slots: >= 97 %); orchestration CPU seconds per candidate (goal <= 0.03 s):
the CPU (user + system, every thread) of this process, which plays the CLI (the roles run
in-process, the progress display, this benchmark's clock and, with --proposer llm, the
scripted model server's threads), plus that of each role process of `--role-processes`
(read from /proc/<pid>/stat at every candidate and every half second, so the last reading
is taken just before the role exits). Not counted: the sandboxed run and smoke-run
processes (reported apart: reaped by this process's sandbox launcher, or its reaped
children, role processes included), and the nats-server. Counted: the sandbox launcher's
own CPU (groundloop.execution.launcher, the small process that forks the runs).

`--role-processes`: off = every role a task of this process; on = the roles `groundloop
search --role-processes` moves out (groundloop.cli.embedded_roles.ROLE_PROCESSES); or a
comma-separated list of roles (projector, evolver, ideator, implementer, runner).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import SecretStr  # noqa: E402

from benchmarks.scripted_model import ScriptedModel  # noqa: E402
from groundloop import events as ev  # noqa: E402
from groundloop.broker import EmbeddedBroker, free_port  # noqa: E402
from groundloop.bus import Bus  # noqa: E402
from groundloop.cli.embedded_roles import (  # noqa: E402
    ROLE_PROCESSES,
    ROLE_PROCESSES_BY_DEFAULT,
    check_roles,
)
from groundloop.cli.search_job import default_deadline, run_search  # noqa: E402
from groundloop.execution.environment import Environment  # noqa: E402
from groundloop.execution.launcher import children_cpu_seconds  # noqa: E402
from groundloop.llm.client import LLMSettings  # noqa: E402
from groundloop.search_request import priced_models, search_started_event  # noqa: E402
from groundloop.settings import Settings  # noqa: E402
from tests.llm_server import FakeLLMServer  # noqa: E402
from tests.paths import ENVIRONMENTS  # noqa: E402

WINDOW = 200  # candidates in the first / last window


def copy_environment(root: Path, eval_seconds: float) -> Path:
    """The synthetic environment under `root`, its runs sleeping `eval_seconds`."""
    envs = root / "environments"
    shutil.copytree(ENVIRONMENTS / "synthetic", envs / "synthetic")
    config = envs / "synthetic" / "config.py"
    text = re.sub(
        r"(?m)^SLEEP_SECONDS = .*$", f"SLEEP_SECONDS = {eval_seconds!r}", config.read_text()
    )
    config.write_text(text)
    return envs


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROLE_CHILD = b"groundloop.cli.role_child"  # in the command line of every role process


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on; the name in parentheses may hold spaces."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


class RoleProcessCpu:
    """CPU seconds (user + system, every thread; not its children) of each role process of
    this one, from /proc/<pid>/stat. The last reading of a process is kept once it is gone,
    so sampling often enough reads it just before it exits."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seconds: dict[int, float] = {}
        self.modules: dict[int, str] = {}  # the role's entry point, e.g. groundloop.runner

    def _discover(self) -> None:
        me = str(os.getpid())
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in self.seconds:
                continue
            try:
                if _stat_fields(int(entry.name))[1] != me:
                    continue
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if ROLE_CHILD in argv:
                    self.seconds[int(entry.name)] = 0.0
                    self.modules[int(entry.name)] = argv[argv.index(ROLE_CHILD) + 1].decode()
            except (OSError, IndexError):
                continue  # exited while listed

    def sample(self) -> float:
        if len(self.seconds) < self.expected:
            self._discover()
        for pid in self.seconds:
            try:
                fields = _stat_fields(pid)
                self.seconds[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            except (OSError, IndexError, ValueError):
                pass  # gone: keep its last reading
        return sum(self.seconds.values())

    async def sample_every(self, period_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            await asyncio.sleep(period_s)


class Clock:
    """Receipt times of RunStarted / RunCompleted (a core subscription on this process's
    own connection, so it costs what a dashboard watching the search would)."""

    def __init__(self, roles: RoleProcessCpu) -> None:
        self.started: list[float] = []
        self.completed: list[tuple[float, ev.RunCompleted]] = []
        self.cpu_at: list[float] = []  # orchestration CPU seconds at each candidate
        self.roles = roles

    async def start(self, bus: Bus) -> None:
        async def on_msg(msg) -> None:
            now = time.perf_counter()
            event = ev.decode(msg.data)
            if isinstance(event, ev.RunStarted):
                self.started.append(now)
            elif isinstance(event, ev.RunCompleted):
                self.completed.append((now, event))
                if event.purpose == "search":
                    self.cpu_at.append(cpu_seconds() + self.roles.sample())

        prefix = bus.settings.subject_prefix
        await bus.nc.subscribe(f"{prefix}.*.RunStarted.>", cb=on_msg)
        await bus.nc.subscribe(f"{prefix}.*.RunCompleted.>", cb=on_msg)


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def role_processes(choice: str) -> tuple[str, ...]:
    if choice == "off":
        return ()
    if choice == "on":
        return ROLE_PROCESSES
    roles = tuple(part.strip() for part in choice.split(",") if part.strip())
    check_roles(roles)
    return roles


def window_rate(times: list[float]) -> float:
    return (
        (len(times) - 1) / (times[-1] - times[0])
        if len(times) > 1 and times[-1] > times[0]
        else 0.0
    )


async def bench(args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="gl-pipeline-"))
    envs = copy_environment(root, args.eval_seconds)
    env = Environment.load("synthetic", envs)
    settings = Settings(data_dir=root, db_url=f"sqlite:///{root / 'p.db'}", environments_dir=envs)
    generations = math.ceil(args.candidates / args.ideas_per_generation)
    server = FakeLLMServer().start() if args.proposer == "llm" else None
    llm_settings = model = None
    prices: dict[str, ev.ModelPrice] = {}
    if server is not None:
        server.responder = ScriptedModel(env).reply
        model = f"openai-compatible:bench-model@{server.openai_base_url}"
        llm_settings = LLMSettings(
            openai_api_key=SecretStr("unused"), max_concurrency=args.model_concurrency
        )
        prices, _ = priced_models([model], llm_settings)
    started = search_started_event(
        f"pipeline-{args.proposer}",
        env,
        strategy="evolution",
        generations=generations,
        ideas=args.ideas_per_generation,
        seed=0,
        model=model,
        implementer_model=None,
        baseline_seeds=1,
        final_top_k=1,
        final_seeds=1,
        budgets=ev.Budgets(),
        deadline=default_deadline(env, args.ideas_per_generation, args.slots),
        price_table=prices,
        samples=args.samples,
        revisions=0,
        edit_format="diff" if model else None,
        schedule=args.schedule,
    )
    # The search has no policy, so no rl-trainer to run anywhere.
    apart = tuple(r for r in role_processes(args.role_processes) if r != "rl-trainer")
    roles = RoleProcessCpu(expected=len(apart))
    clock = Clock(roles)
    try:
        with EmbeddedBroker(root, free_port()) as broker:
            live = settings.model_copy(update={"nats_url": broker.url})
            watcher = await Bus.connect(live, "bench-clock")
            await clock.start(watcher)
            cpu0, children0 = cpu_seconds(), cpu_seconds(resource.RUSAGE_CHILDREN)
            runs0, launcher0 = children_cpu_seconds()
            sampling = asyncio.Event()
            sampler = asyncio.create_task(roles.sample_every(0.5, sampling))
            t0 = time.perf_counter()
            try:
                await run_search(
                    live,
                    started,
                    env,
                    slots=args.slots,
                    report_dir=root / "reports",
                    llm_settings=llm_settings,
                    role_processes=apart,
                )
            finally:
                sampling.set()
                await sampler
            wall = time.perf_counter() - t0
            role_cpu = sum(roles.seconds.values())
            cpu = cpu_seconds() - cpu0 + role_cpu
            # Sandboxed runs are children of this process's launcher (reaped there, reported
            # back); the launcher is orchestration. Role processes' launchers and runs are
            # counted in their CPU and their reaped children respectively.
            runs1, launcher1 = children_cpu_seconds()
            runs, launcher = runs1 - runs0, launcher1 - launcher0
            cpu += launcher
            children = cpu_seconds(resource.RUSAGE_CHILDREN) - children0 - role_cpu + runs
            await watcher.close()
    finally:
        if server is not None:
            server.stop()
    search = [(t, e) for t, e in clock.completed if e.purpose == "search"]
    times = [t for t, _ in search]
    n = len(search)
    statuses: dict[str, int] = {}
    for _, e in search:
        statuses[e.status] = statuses.get(e.status, 0) + 1
    walls = sorted(e.wall_seconds for _, e in clock.completed)
    busy = sum(walls)
    span = (clock.completed[-1][0] - clock.started[0]) if clock.completed and clock.started else 0.0
    result = {
        "proposer": args.proposer,
        "role_processes": ",".join(apart) or "off",
        "schedule": args.schedule,
        "candidates": n,
        "statuses": statuses,
        "slots": args.slots,
        "eval_seconds": args.eval_seconds,
        "ideas_per_generation": args.ideas_per_generation,
        "launch_to_first_candidate_s": times[0] - t0 if times else None,
        "rate_all": window_rate(times),
        "rate_first": window_rate(times[:WINDOW]),
        "rate_last": window_rate(times[-WINDOW:]),
        "utilisation": busy / (args.slots * span) if span else 0.0,
        "idle_slot_s": idle_slot_seconds(clock, args.slots, span, busy),
        "run_wall_p50_p95_s": [walls[len(walls) // 2], walls[int(len(walls) * 0.95)]]
        if walls
        else [],
        # The launcher's CPU is read at the end, not per candidate: spread evenly.
        "cpu_per_candidate_s": (clock.cpu_at[-1] - cpu0 + launcher) / n if n else None,
        "launcher_cpu_s": launcher,
        "cpu_total_s": cpu,
        "role_processes_cpu_s": role_cpu,
        "cpu_s_by_role_process": {roles.modules[p]: round(c, 2) for p, c in roles.seconds.items()},
        "children_cpu_s": children,
        "wall_s": wall,
        "root": str(root),
    }
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def idle_slot_seconds(clock: Clock, slots: int, span: float, busy: float) -> dict[str, float]:
    """Where the slots' idle time went, from receipt times: before every slot had started its
    first run (ramp-up), after the last run started (drain), and between runs (the rest)."""
    if not clock.started or not clock.completed:
        return {}
    first, end = clock.started[0], clock.completed[-1][0]
    ramp = sum(t - first for t in clock.started[:slots])
    last_start = clock.started[-1]
    drain = sum(end - max(t, last_start) for t, _ in clock.completed[-slots:])
    between = max(slots * span - busy - ramp - drain, 0.0)
    runs = max(len(clock.completed) - slots, 1)
    return {"ramp_up": ramp, "drain": drain, "between_runs": between, "per_run": between / runs}


def show(r: dict) -> None:
    ratio = r["rate_last"] / r["rate_first"] if r["rate_first"] else 0.0
    first = r["launch_to_first_candidate_s"]
    idle = r["idle_slot_s"]
    print(
        f"pipeline, proposer {r['proposer']}, role processes {r['role_processes']}, "
        f"schedule {r['schedule']}, {r['candidates']} candidates "
        f"({r['ideas_per_generation']}/generation), {r['slots']} slots, "
        f"{r['eval_seconds']:g}-s runs; statuses {r['statuses']}\n"
        f"  launch -> first candidate : {first:.2f} s\n"
        f"  candidates/s, all         : {r['rate_all']:.2f}  (goal >= 30 with no-op runs)\n"
        f"  first {WINDOW} -> last {WINDOW}    : {r['rate_first']:.2f} -> {r['rate_last']:.2f}"
        f" ({ratio:.0%}; goal >= 90%)\n"
        f"  slot utilisation          : {r['utilisation']:.1%}  (goal >= 97% with 1-s runs, 8 slots)\n"
        f"  idle slot-seconds         : ramp-up {idle.get('ramp_up', 0):.1f}, drain "
        f"{idle.get('drain', 0):.1f}, between runs {idle.get('between_runs', 0):.1f} "
        f"({1000 * idle.get('per_run', 0):.0f} ms per run)\n"
        f"  run wall, p50 / p95       : "
        f"{' / '.join(f'{1000 * w:.0f} ms' for w in r['run_wall_p50_p95_s'])}\n"
        f"  orchestration CPU/cand.   : {r['cpu_per_candidate_s']:.4f} s  (goal <= 0.03; this "
        f"process and the role processes; {r['cpu_total_s']:.1f} s in all, "
        f"{r['role_processes_cpu_s']:.1f} s of it in role processes)\n"
        f"  sandboxed children CPU    : {r['children_cpu_s']:.1f} s; wall {r['wall_s']:.1f} s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--proposer", choices=("llm", "knobs"), default="llm")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--ideas-per-generation", type=int, default=50)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--eval-seconds", type=float, default=0.0)
    parser.add_argument(
        "--samples", type=int, default=1, help="implementer samples per idea (one candidate each)"
    )
    parser.add_argument("--model-concurrency", type=int, default=8)
    parser.add_argument(
        "--role-processes",
        default="on" if ROLE_PROCESSES_BY_DEFAULT else "off",
        help="on | off | ROLE,ROLE...: the roles run as child processes (default: as "
        "`groundloop search`)",
    )
    parser.add_argument("--schedule", choices=("generational", "steady"), default="generational")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    args = parser.parse_args()
    result = asyncio.run(bench(args))
    show(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
