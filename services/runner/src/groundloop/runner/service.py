"""The runner: execute patches (and requested baseline / re-evaluation runs) in the sandbox.

Consumes PatchReady and RunRequested of its resource class from the durable consumer
`runner-<class>` shared by every replica; emits RunStarted when a run's process starts and
RunCompleted (succeeded / failed / timed_out / killed / rejected) when it ends. Per run: a
fresh workspace (environment + patch, strictly applied: a patch escaping the workspace is
rejected and never runs), protected digests verified, `groundloop.execution.environment.execute` in the
sandbox with the manifest's budget, the log streamed to the object store, heartbeats while it
runs. SIGTERM: stop fetching; a run that ends within `shutdown_grace_s` finishes, any other is
stopped and handed back (Retry) for another replica. After the last allowed delivery,
`on_exhausted` records the run as failed.

Run alone:  python -m groundloop.runner --slots 2      (see __main__.py for flags)
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import shutil
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from nats.js.errors import ObjectNotFoundError

from groundloop.bus import Bus, describe
from groundloop.consumer import Delivery, Retry, consume
from groundloop.execution.environment import (
    Environment,
    Execution,
    PatchRejected,
    ProtectedFileChanged,
    execute,
    provenance,
)
from groundloop.events import Event, PatchReady, RunCompleted, RunRequested, RunStarted, stable_id
from groundloop.manifest import ManifestError
from groundloop.runner.logs import LogStreamer, PutArtifact, log_key
from groundloop.runner.slots import RunnerSettings, Slot, SlotPool, plan_slots
from groundloop.execution.sandbox import Limits, cancel_on, sweep_orphaned_runs
from groundloop.settings import Settings

log = logging.getLogger(__name__)

PRODUCER = "runner"  # the same on every replica, so derived event ids agree across replicas
ERROR_TAIL_CHARS = 2000


@dataclass(frozen=True)
class RunSpec:
    """What to run, from a PatchReady (first run of a patch) or a RunRequested."""

    run_id: str
    patch_id: str | None
    idea_id: str | None
    generation: int
    purpose: str
    seed: int
    environment: str
    environment_digest: str
    diff: str | None
    diff_key: str | None


def run_spec(event: Event) -> RunSpec:
    if isinstance(event, PatchReady):
        return RunSpec(
            stable_id(event.patch_id, event.seed),
            event.patch_id,
            event.idea_id,
            event.generation,
            "search",
            event.seed,
            event.environment,
            event.environment_digest,
            event.diff,
            event.diff_key,
        )
    if isinstance(event, RunRequested):
        return RunSpec(
            event.run_id,
            event.patch_id,
            event.idea_id,
            event.generation,
            event.purpose,
            event.seed,
            event.environment,
            event.environment_digest,
            event.diff,
            event.diff_key,
        )
    raise TypeError(f"the runner does not handle {event.type}")  # type: ignore[attr-defined]


@dataclass
class RunnerDeps:
    settings: Settings
    runner: RunnerSettings
    slots: SlotPool
    publish: Callable[[Event], Awaitable[object]]  # immediate publish (RunStarted)
    put_artifact: PutArtifact
    get_artifact: Callable[[str], Awaitable[bytes]]
    shutdown: asyncio.Event = field(default_factory=asyncio.Event)  # SIGTERM received
    host: str = field(default_factory=socket.gethostname)
    environments: dict[str, tuple[Environment, str]] = field(
        default_factory=dict
    )  # name -> (env, digest)
    # One thread per slot for the blocking sandbox (asyncio's default pool has only cpus+4).
    executor: ThreadPoolExecutor | None = None


def completed(event: Event, spec: RunSpec, status: str, **fields: object) -> RunCompleted:
    """The run's one RunCompleted: index 0 of the runner role, whichever replica (or the
    exhaustion handler) writes it, so duplicates collapse in the stream."""
    return event.derive(
        RunCompleted,
        PRODUCER,
        0,
        run_id=spec.run_id,
        patch_id=spec.patch_id,
        idea_id=spec.idea_id,
        generation=spec.generation,
        purpose=spec.purpose,
        status=status,
        seed=spec.seed,
        **fields,
    )


async def handle(event: Event, delivery: Delivery, deps: RunnerDeps) -> list[Event]:
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
    # Heartbeats cover everything, materialising and the environment's `prepare` included.
    async with deps.slots.slot() as slot, delivery.heartbeat():
        return await _run(event, delivery, deps, spec, env, diff, slot)


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


async def _run(
    event: Event,
    delivery: Delivery,
    deps: RunnerDeps,
    spec: RunSpec,
    env: Environment,
    diff: str | None,
    slot: Slot,
) -> list[Event]:
    base = (
        deps.settings.data_dir
        / "runner"
        / deps.runner.runner_id
        / spec.run_id
        / f"attempt-{delivery.attempt}"
    )
    workspace, run_dir = base / "workspace", base / "run"
    try:
        try:
            made = await asyncio.to_thread(_fresh_workspace, env, workspace, diff)
        except PatchRejected as exc:
            log.warning("run %s: patch rejected, not run: %s", spec.run_id, exc.reason)
            return [completed(event, spec, "rejected", reason=f"patch rejected: {exc.reason}")]
        started = event.derive(
            RunStarted,
            PRODUCER,
            delivery.attempt,
            run_id=spec.run_id,
            patch_id=spec.patch_id,
            idea_id=spec.idea_id,
            runner_id=deps.runner.runner_id,
            host=deps.host,
            devices=list(slot.devices),
            seed=spec.seed,
            attempt=delivery.attempt,
        )
        await deps.publish(started)
        log.info(
            "run %s started (%s, attempt %d, slot %d)",
            spec.run_id,
            describe(event),
            delivery.attempt,
            slot.index,
        )
        streamer = LogStreamer(
            deps.put_artifact,
            log_key(spec.run_id, delivery.attempt),
            chunk_bytes=deps.runner.log_chunk_bytes,
            flush_s=deps.runner.log_flush_s,
            max_bytes=deps.runner.max_log_bytes,
        )
        try:
            execution, handed_back = await _execute(
                delivery, deps, spec, env, workspace, run_dir, slot, streamer
            )
        finally:
            key = await streamer.close()
        if handed_back:
            raise Retry(
                f"runner {deps.runner.runner_id} shutting down; run {spec.run_id} handed back",
                delay=0.1,
            )
        if isinstance(execution, str):
            return [completed(event, spec, "rejected", reason=execution, log_key=key)]
        return [
            _result(event, spec, env, execution, made.patched_digest, made.diff_digest, slot, key)
        ]
    finally:
        if not deps.runner.keep_workspaces:
            await asyncio.to_thread(shutil.rmtree, base, True)


def _fresh_workspace(env: Environment, workspace: Path, diff: str | None):  # -> Materialized
    if workspace.parent.exists():  # a previous life of this attempt on this host
        shutil.rmtree(workspace.parent)
    return env.materialize(workspace, diff)


async def _execute(
    delivery: Delivery,
    deps: RunnerDeps,
    spec: RunSpec,
    env: Environment,
    workspace: Path,
    run_dir: Path,
    slot: Slot,
    streamer: LogStreamer,
) -> tuple[Execution | str | None, bool]:
    """Run the protocol in a worker thread with heartbeats; on runner shutdown, wait the
    grace period and then stop the run. Returns (execution or rejection reason, handed_back)."""
    cancel = threading.Event()
    resources = env.manifest.resources
    memory = None
    if not slot.devices and deps.runner.address_space_factor:
        memory = int(resources.memory_gb * deps.runner.address_space_factor * 1024**3)
    limits = Limits(
        memory_bytes=memory,
        max_processes=deps.runner.max_processes,
        file_size_bytes=deps.runner.file_size_bytes,
        open_files=deps.runner.open_files,
    )
    extra = {
        "CUDA_VISIBLE_DEVICES": slot.cuda_visible_devices,
        "OMP_NUM_THREADS": str(resources.cpus),
    }
    cache_dir = deps.settings.data_dir / "cache" / env.name

    def work() -> Execution | str:
        try:
            return execute(
                env,
                workspace,
                seed=spec.seed,
                split=_split(env, spec),
                device="cuda" if slot.devices else "cpu",
                run_dir=run_dir,
                cache_dir=cache_dir,
                limits=limits,
                extra_env=extra,
                on_output=streamer.write,
            )
        except ProtectedFileChanged as exc:
            return f"protected file changed: {exc}"

    with cancel_on(cancel):  # the copied context carries cancel_on into the worker thread
        call = functools.partial(contextvars.copy_context().run, work)
        task = asyncio.get_running_loop().run_in_executor(deps.executor, call)
    shutdown = asyncio.create_task(deps.shutdown.wait())
    await asyncio.wait({task, shutdown}, return_when=asyncio.FIRST_COMPLETED)
    shutdown.cancel()
    if not task.done():
        log.info(
            "run %s: runner stopping; waiting up to %.0fs for it to finish",
            spec.run_id,
            deps.runner.shutdown_grace_s,
        )
        await asyncio.wait({task}, timeout=deps.runner.shutdown_grace_s)
        if not task.done():
            cancel.set()
            await task
            return None, True
    return task.result(), False


def _split(env: Environment, spec: RunSpec) -> str:
    """Search runs (and baselines) measure on the search split; the final re-evaluation
    (RunRequested purpose "reeval", baseline included) on the held-out final split."""
    metric = env.manifest.metric
    return metric.final_split if spec.purpose == "reeval" and metric.final_split else metric.split


def _result(
    event: Event,
    spec: RunSpec,
    env: Environment,
    execution: Execution,
    patched_digest: str,
    patch_digest: str,
    slot: Slot,
    key: str,
) -> RunCompleted:
    outcome = execution.outcome
    status = outcome.status
    if execution.train.status == "killed" and status != "rejected":
        status = "killed"  # a limit (processes, the kernel's OOM killer) stopped it
    reason = (outcome.reason or "").split("\n--- log tail ---")[0] or None
    last = execution.evaluate or execution.train
    error_tail = None if status == "succeeded" else last.output_tail[-ERROR_TAIL_CHARS:]
    log.info(
        "run %s %s score=%s (%.1fs)", spec.run_id, status, outcome.score, execution.wall_seconds
    )
    return completed(
        event,
        spec,
        status,
        metrics=outcome.metrics,
        score=outcome.score,
        reward=outcome.reward,
        wall_seconds=execution.wall_seconds,
        gpu_seconds=execution.wall_seconds * len(slot.devices),
        log_key=key,
        error_tail=error_tail,
        reason=reason,
        provenance=provenance(
            env,
            seed=spec.seed,
            patched_digest=patched_digest,
            patch_digest=patch_digest,
            isolation=execution.isolation,
        ),
    )


def exhausted_handler(max_deliver: int) -> Callable[[Event, str], Awaitable[list[Event]]]:
    async def on_exhausted(event: Event, reason: str) -> list[Event]:
        """Every delivery ended without an ack (each runner that took it died): record it."""
        why = f"runner lost on every one of {max_deliver} deliveries ({reason})"
        return [completed(event, run_spec(event), "failed", reason=why)]

    return on_exhausted


def consumer_name(resource_class: str) -> str:
    return f"runner-{resource_class}"


async def run(
    settings: Settings, runner: RunnerSettings, stop: asyncio.Event | None = None
) -> None:
    """Serve until `stop` is set (SIGTERM): stop fetching, finish or hand back current runs."""
    stop = stop or asyncio.Event()
    if runner.backend != "local":
        raise SystemExit(
            f"backend {runner.backend!r}: container command templates exist "
            "(groundloop.runner.containers) but environment.execute has no command wrapper yet; "
            "run with --backend local"
        )
    swept = await asyncio.to_thread(sweep_orphaned_runs)
    if swept:
        log.warning("killed the leftovers of %d run(s) of a runner that died", swept)
    slots = SlotPool(plan_slots(runner))
    executor = ThreadPoolExecutor(len(slots), thread_name_prefix=f"runner-{runner.runner_id}")
    bus = await Bus.connect(settings, f"runner-{runner.runner_id}")
    try:
        deps = RunnerDeps(
            settings,
            runner,
            slots,
            bus.publish,
            bus.put_artifact,
            bus.get_artifact,
            shutdown=stop,
            executor=executor,
        )
        filters = [
            bus.subject_filter(type=kind, key=runner.resource_class)
            for kind in ("PatchReady", "RunRequested")
        ]
        log.info(
            "runner %s serving %s with %d slot(s) %s",
            runner.runner_id,
            runner.resource_class,
            len(slots),
            [list(s.devices) for s in slots.slots],
        )

        async def handler(event: Event, delivery: Delivery) -> list[Event]:
            return await handle(event, delivery, deps)

        await consume(
            bus,
            consumer_name(runner.resource_class),
            filters,
            handler,
            stop=stop,
            concurrency=len(slots),
            on_exhausted=exhausted_handler(settings.max_deliver),
        )
    finally:
        executor.shutdown(wait=False)
        await bus.close()
