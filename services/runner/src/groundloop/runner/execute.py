"""One run in the sandbox: a fresh workspace (environment + patch, strictly applied), then,
once a slot is free, RunStarted and the protocol executed in a worker thread with the log
streamed to the object store; the slot is given back when the process ends, before the log's
last chunk is stored and the RunCompleted built, so the next run starts meanwhile. On runner
shutdown a run that does not end within `shutdown_grace_s` is stopped and handed back (Retry)
for another replica; a run still waiting for a slot is handed back at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import shutil
import time
from pathlib import Path

from groundloop import telemetry
from groundloop.bus import describe
from groundloop.consumer import Delivery, Retry
from groundloop.events import Event, RunCompleted, RunStarted
from groundloop.execution.environment import (
    Environment,
    Execution,
    Materialized,
    PatchRejected,
    ProtectedFileChanged,
    execute,
    provenance,
)
from groundloop.execution.sandbox import Cancellation, Limits, cancel_on
from groundloop.manifest import Resources
from groundloop.runner.logs import LogStreamer, log_key
from groundloop.runner.runs import PRODUCER, RunnerDeps, RunSpec, completed
from groundloop.runner.slots import RunnerSettings, Slot, Turn, run_uid

log = logging.getLogger(__name__)

ERROR_TAIL_CHARS = 2000


async def run_one(
    event: Event,
    delivery: Delivery,
    deps: RunnerDeps,
    spec: RunSpec,
    env: Environment,
    diff: str | None,
    turn: Turn,
) -> list[Event]:
    """Run `spec` in the slot `turn` brings and return its RunCompleted; raises Retry when the
    runner shuts down before the run ends."""
    base = (
        deps.settings.data_dir
        / "runner"
        / deps.runner.runner_id
        / spec.run_id
        / f"attempt-{delivery.attempt}"
    )
    workspace, run_dir = base / "workspace", base / "run"
    telemetry.annotate(
        run_id=spec.run_id, patch_id=spec.patch_id, idea_id=spec.idea_id, purpose=spec.purpose
    )
    try:
        try:
            with telemetry.step("materialise"):
                made = await asyncio.to_thread(_fresh_workspace, env, workspace, diff)
        except PatchRejected as exc:
            log.warning("run %s: patch rejected, not run: %s", spec.run_id, exc.reason)
            reason = f"patch rejected: {exc.reason}"
            return [completed(event, spec, "rejected", reason=reason)]
        slot = await turn.slot()
        if slot is None:
            raise Retry(
                f"runner {deps.runner.runner_id} shutting down; run {spec.run_id} handed back "
                "before it started",
                delay=0.1,
            )
        # The process starts while RunStarted is on its way: the publish is awaited before
        # the RunCompleted is returned, so the log still has them in that order.
        announcing = asyncio.ensure_future(
            deps.publish(_started(event, delivery, deps, spec, slot))
        )
        streamer = LogStreamer(
            deps.put_artifact,
            log_key(spec.run_id, delivery.attempt),
            chunk_bytes=deps.runner.log_chunk_bytes,
            flush_s=deps.runner.log_flush_s,
            max_bytes=deps.runner.max_log_bytes,
        )
        try:
            execution = await _execute(
                delivery, deps, spec, env, workspace, run_dir, slot, streamer
            )
        except BaseException:
            await streamer.close()
            raise
        finally:
            turn.give_back()
            await _announced(announcing)
        delivery.release()  # the slot is free: the next run is fetched while this one ends
        key = await streamer.close()
        if execution is None:
            raise Retry(
                f"runner {deps.runner.runner_id} shutting down; run {spec.run_id} handed back",
                delay=0.1,
            )
        if isinstance(execution, str):
            return [completed(event, spec, "rejected", reason=execution, log_key=key)]
        done = _result(
            event, spec, env, execution, made.patched_digest, made.diff_digest, slot, key
        )
        return [done]
    finally:
        if not deps.runner.keep_workspaces:
            await asyncio.to_thread(shutil.rmtree, base, True)


async def _announced(announcing: asyncio.Future) -> None:
    """Wait for RunStarted to be stored; when a cancelled run ends first, stop waiting."""
    if not announcing.done():
        try:
            await asyncio.shield(announcing)
        except asyncio.CancelledError:
            announcing.cancel()
            raise
    announcing.result()  # a RunStarted that could not be stored fails the run (retried)


def _started(
    event: Event, delivery: Delivery, deps: RunnerDeps, spec: RunSpec, slot: Slot
) -> RunStarted:
    log.info(
        "run %s started (%s, attempt %d, slot %d)",
        spec.run_id,
        describe(event),
        delivery.attempt,
        slot.index,
    )
    return event.derive(
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
        isolation=deps.protections.get(slot.index, {}),
    )


def _fresh_workspace(env: Environment, workspace: Path, diff: str | None) -> Materialized:
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
) -> Execution | str | None:
    """Run the protocol in a worker thread with heartbeats; on runner shutdown, wait the
    grace period and then stop the run. Returns the execution, the reason it was rejected, or
    None when the run was stopped to be handed back."""
    cancel = Cancellation()  # wakes the run at once when set (a plain Event is polled)
    resources = env.manifest.resources
    limits = run_limits(deps.runner, slot, resources)
    extra = {
        "CUDA_VISIBLE_DEVICES": slot.cuda_visible_devices,
        "OMP_NUM_THREADS": str(resources.cpus),
    }
    cache_dir = deps.settings.data_dir / "cache" / env.name

    def work() -> Execution | str:
        try:
            with telemetry.step("run", seed=spec.seed, split=_split(env, spec)):
                execution = execute(
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
                _trace_phases(execution)
                return execution
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
            return None
    return task.result()


def _trace_phases(execution: Execution) -> None:
    """Training and evaluation as spans, timed by the sandbox: the evaluation is the run's last
    step (without an `evaluate` command the score is judged from training's metrics as it ends)."""
    now = time.time_ns()
    evaluate_s = execution.evaluate.wall_seconds if execution.evaluate else 0.0
    train_end = now - int(evaluate_s * 1e9)
    telemetry.finished_step("train", execution.train.wall_seconds, train_end)
    outcome = execution.outcome
    telemetry.finished_step("evaluate", evaluate_s, now, status=outcome.status, score=outcome.score)


def run_limits(runner: RunnerSettings, slot: Slot, resources: Resources) -> Limits:
    """The sandbox limits of a run in `slot`: resident memory (the memory cgroup) at the
    manifest's memory_gb for every slot; RLIMIT_AS only on CPU slots (CUDA reserves address
    space by the terabyte); the slot's run uid; full isolation when the runner requires it."""
    address_space = None
    if not slot.devices and runner.address_space_factor:
        address_space = int(resources.memory_gb * runner.address_space_factor * 1024**3)
    return Limits(
        memory_bytes=address_space,
        max_processes=runner.max_processes,
        file_size_bytes=runner.file_size_bytes,
        open_files=runner.open_files,
        resident_memory_bytes=int(resources.memory_gb * 1024**3),
        isolate=True,
        run_uid=run_uid(runner, slot),
        require_full_isolation=runner.require_full_isolation,
    )


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
