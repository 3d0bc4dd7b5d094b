"""The runner: execute patches (and requested baseline / re-evaluation runs) in the sandbox.

Consumes PatchReady and RunRequested of its resource class from the durable consumer
`runner-<class>` shared by every replica; emits RunStarted when a run's process starts and
RunCompleted (succeeded / failed / timed_out / killed / rejected) when it ends. A replica
holds at most its slots + `prefetch` runs (slots.py): the next run is materialised while it
waits, and fetched as soon as a slot's process ends. Per run: a
fresh workspace (environment + patch, strictly applied: a patch escaping the workspace is
rejected and never runs), protected digests verified, `groundloop.execution.environment.execute`
in the sandbox with the manifest's budget, the log streamed to the object store, heartbeats
while it runs (execute.py). SIGTERM: stop fetching; a run that ends within `shutdown_grace_s`
finishes, any other is stopped and handed back (Retry) for another replica. After the last
allowed delivery, `on_exhausted` records the run as failed. At start-up the sandbox
protections each slot's runs get on this host are logged (a WARNING names every gap) and
recorded in every RunStarted; `require_full_isolation` refuses to start with any gap.
Only events that fit their search's log are run (groundloop.search_index): a PatchReady or
RunRequested of a search never started, a PatchReady for an idea never proposed, a
RunRequested not written by the evolver or for a patch never ready is refused (quarantined,
dead-lettered) before anything runs, checked against the log up to the event's own sequence.

`role(settings, runner)` declares the service for groundloop.skeleton;
`await run(settings, runner, stop)` serves it.
Run alone:  python -m groundloop.runner --slots 2      (see __main__.py for flags)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nats.js.errors import ObjectNotFoundError

from groundloop.bus import Bus
from groundloop.consumer import Delivery, Reject, Retry
from groundloop.events import Event, PatchReady, RunRequested
from groundloop.execution.bubblewrap import (
    IsolationUnavailable,
    host_protections,
    isolation_gaps,
    require_full_isolation,
)
from groundloop.execution.environment import Environment
from groundloop.execution.sandbox import sweep_orphaned_runs
from groundloop.manifest import ManifestError
from groundloop.runner.execute import run_one
from groundloop.runner.runs import PRODUCER, RunnerDeps, RunSpec, completed, run_spec
from groundloop.runner.slots import RunnerSettings, Slot, SlotPool, Turn, plan_slots, run_uid
from groundloop.search_index import LogIndex
from groundloop.settings import Settings
from groundloop.skeleton import Role, run_role

__all__ = [
    "PRODUCER",
    "RunSpec",
    "RunnerDeps",
    "completed",
    "consumer_name",
    "exhausted_handler",
    "handle",
    "on_delivery",
    "role",
    "run",
    "run_spec",
    "slot_protections",
]

log = logging.getLogger(__name__)


@dataclass
class ServedRunnerDeps(RunnerDeps):
    """A served replica's dependencies: the process's and the log index its checks read."""

    log_index: LogIndex | None = None


async def on_delivery(event: Event, delivery: Delivery, deps: ServedRunnerDeps) -> list[Event]:
    """Run the event only if it fits its search's log up to its own stream sequence."""
    async with deps.slots.queue(deps.shutdown) as turn:  # in line in the order fetched
        if deps.log_index is not None:
            why = await deps.log_index.refusal(event, delivery.seq)
            if why is not None:
                raise Reject(f"not run: {why}")
        return await _prepared(event, delivery, deps, turn)


async def handle(event: Event, delivery: Delivery, deps: RunnerDeps) -> list[Event]:
    async with deps.slots.queue(deps.shutdown) as turn:
        return await _prepared(event, delivery, deps, turn)


async def _prepared(event: Event, delivery: Delivery, deps: RunnerDeps, turn: Turn) -> list[Event]:
    spec = run_spec(event)
    try:
        env, digest = await _environment(spec, deps)
    except (ManifestError, FileNotFoundError, ValueError) as exc:
        return _unrunnable(event, spec, delivery, f"environment {spec.environment!r}: {exc}")
    if digest != spec.environment_digest:
        return _unrunnable(
            event,
            spec,
            delivery,
            (
                f"environment {env.name} on runner {deps.runner.runner_id} has digest "
                f"{digest[:12]}, the event wants {spec.environment_digest[:12]}: deploy the same "
                "environment version on every runner"
            ),
        )
    diff = spec.diff
    if diff is None and spec.diff_key:
        try:
            diff = (await deps.get_artifact(spec.diff_key)).decode()
        except (ObjectNotFoundError, KeyError, UnicodeDecodeError) as exc:
            return _unrunnable(
                event, spec, delivery, f"cannot read the diff {spec.diff_key}: {exc!r}"
            )
    # Heartbeats cover everything: materialising, waiting for a slot, the environment's
    # `prepare`, the run, storing its log.
    async with delivery.heartbeat():
        return await run_one(event, delivery, deps, spec, env, diff, turn)


def _unrunnable(event: Event, spec: RunSpec, delivery: Delivery, reason: str) -> list[Event]:
    if not delivery.last_attempt:  # another replica (maybe newer) may have what this lacks
        raise Retry(reason, delay=5.0)
    return [completed(event, spec, "failed", reason=reason)]


async def _environment(spec: RunSpec, deps: RunnerDeps) -> tuple[Environment, str]:
    """The environment and its digest, cached (hashing every file per run is slow for big
    environments); reloaded when an event asks for another digest, e.g. after a deploy."""
    cached = deps.environments.get(spec.environment)
    if cached is None or cached[1] != spec.environment_digest:

        def load() -> tuple[Environment, str]:
            env = Environment.load(spec.environment, deps.settings.environments_dir)
            return env, env.digest()

        cached = deps.environments[spec.environment] = await asyncio.to_thread(load)
    return cached


def exhausted_handler(max_deliver: int) -> Callable[[Event, str], Awaitable[list[Event]]]:
    async def on_exhausted(event: Event, reason: str) -> list[Event]:
        """Every delivery ended without an ack (each runner that took it died): record it."""
        why = f"runner lost on every one of {max_deliver} deliveries ({reason})"
        return [completed(event, run_spec(event), "failed", reason=why)]

    return on_exhausted


def slot_protections(runner: RunnerSettings, slots: list[Slot]) -> dict[int, dict[str, str]]:
    """The protections each slot's runs get on this host (probed once per run uid), logged;
    with `require_full_isolation`, SystemExit naming every gap unless all are in force."""
    by_uid: dict[int, dict[str, str]] = {}
    for uid in sorted({run_uid(runner, slot) for slot in slots}):
        if runner.require_full_isolation:
            try:
                by_uid[uid] = require_full_isolation(uid)
            except IsolationUnavailable as exc:
                raise SystemExit(f"runner {runner.runner_id} refuses to start: {exc}") from exc
        else:
            by_uid[uid] = host_protections(uid)
        log.info("sandbox protections for runs as uid %d: %s", uid, by_uid[uid])
        if gaps := isolation_gaps(by_uid[uid]):
            log.warning(
                "runs as uid %d are NOT fully isolated on this host (recorded in every "
                "RunStarted; --require-full-isolation would refuse to start): %s",
                uid,
                "; ".join(gaps),
            )
    return {slot.index: by_uid[run_uid(runner, slot)] for slot in slots}


def consumer_name(resource_class: str) -> str:
    return f"runner-{resource_class}"


def role(
    settings: Settings, runner: RunnerSettings, log_index: LogIndex | None = None
) -> Role[ServedRunnerDeps]:
    """The runner replica `runner` on the bus: one handler slot per run slot. Replicas that
    share a process may share `log_index` (its owner keeps it open): one follower of each
    search's log for all of them instead of one each (benchmarks/runner.py)."""
    if runner.backend != "local":
        raise SystemExit(
            f"backend {runner.backend!r}: container command templates exist "
            "(groundloop.runner.containers) but environment.execute has no command wrapper yet; "
            "run with --backend local"
        )
    slots = plan_slots(runner)

    @contextlib.asynccontextmanager
    async def context(
        settings: Settings, bus: Bus, stop: asyncio.Event
    ) -> AsyncIterator[ServedRunnerDeps]:
        protections = await asyncio.to_thread(slot_protections, runner, slots)
        swept = await asyncio.to_thread(sweep_orphaned_runs)
        if swept:
            log.warning("killed the leftovers of %d run(s) of a runner that died", swept)
        pool = SlotPool(slots)
        executor = ThreadPoolExecutor(len(pool), thread_name_prefix=f"runner-{runner.runner_id}")
        log.info(
            "runner %s serving %s with %d slot(s) %s",
            runner.runner_id,
            runner.resource_class,
            len(pool),
            [list(s.devices) for s in pool.slots],
        )
        try:
            yield ServedRunnerDeps(
                settings,
                runner,
                pool,
                bus.publish,
                bus.put_artifact,
                bus.get_artifact,
                shutdown=stop,
                executor=executor,
                protections=protections,
                log_index=log_index or LogIndex(bus),
            )
        finally:
            executor.shutdown(wait=False)

    return Role(
        name=consumer_name(runner.resource_class),
        consumes=(PatchReady, RunRequested),
        key=runner.resource_class,
        deps=context,
        handle=on_delivery,
        connection=f"runner-{runner.runner_id}",
        concurrency=len(slots) + (runner.prefetch or 0),
        on_exhausted=exhausted_handler(settings.max_deliver),
    )


async def run(
    settings: Settings,
    runner: RunnerSettings,
    stop: asyncio.Event | None = None,
    log_index: LogIndex | None = None,
) -> None:
    """Serve until `stop` is set (SIGTERM): stop fetching, finish or hand back current runs."""
    await run_role(role(settings, runner, log_index), settings, stop or asyncio.Event())
