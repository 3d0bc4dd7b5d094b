"""The runner's slot plan (disjoint GPU sets) and the container commands that isolate a run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from groundloop.runner.containers import ContainerRun, backend_for
from groundloop.runner.slots import RunnerSettings, Slot, SlotPool, plan_slots

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------------------- without a broker


def test_slots_split_gpus_into_disjoint_sets(monkeypatch):
    four = RunnerSettings(resource_class="gpu1", gpus="0,1,2,3", gpus_per_run=1)
    assert [s.cuda_visible_devices for s in plan_slots(four)] == ["0", "1", "2", "3"]
    pairs = RunnerSettings(resource_class="gpu8", gpus="0,1,2,3,4", gpus_per_run=2)
    assert [s.devices for s in plan_slots(pairs)] == [("0", "1"), ("2", "3")]  # "4" left unused
    monkeypatch.setenv("GROUNDLOOP_RUNNER_GPUS", "4,5")  # what `python -m groundloop.runner` reads
    assert [s.devices for s in plan_slots(RunnerSettings(resource_class="gpu1"))] == [
        ("4",),
        ("5",),
    ]
    monkeypatch.delenv("GROUNDLOOP_RUNNER_GPUS")
    cpu = plan_slots(RunnerSettings(slots=3))
    assert len(cpu) == 3 and all(s.cuda_visible_devices == "" for s in cpu)
    with pytest.raises(ValueError, match="gpus-per-run"):
        RunnerSettings(resource_class="gpu8", gpus="0,1", gpus_per_run=8)
    with pytest.raises(ValueError, match="needs GPUs"):
        RunnerSettings(resource_class="gpu1")


def test_prefetch_defaults_to_one_run_on_cpu_runners_and_none_on_gpu_runners():
    assert RunnerSettings(slots=2).prefetch == 1
    assert RunnerSettings(resource_class="gpu1", gpus="0,1").prefetch == 0
    assert RunnerSettings(resource_class="gpu1", gpus="0", prefetch=2).prefetch == 2
    with pytest.raises(ValueError, match="prefetch"):
        RunnerSettings(prefetch=-1)


async def test_slots_go_to_runs_in_the_order_they_queued_not_the_order_they_ask():
    pool, started = SlotPool([Slot(0)]), []

    async def run(name: str, ready_after: float, hold: float) -> None:
        async with pool.queue() as turn:
            await asyncio.sleep(ready_after)  # materialising
            slot = await turn.slot()
            assert slot == Slot(0)
            started.append(name)
            await asyncio.sleep(hold)
            turn.give_back()
            turn.give_back()  # once only: the pool never holds the slot twice

    first = asyncio.create_task(run("first", 0.2, 0.05))
    await asyncio.sleep(0)  # "first" queues before "second" is created
    second = asyncio.create_task(run("second", 0.0, 0.0))
    await asyncio.gather(first, second)
    assert started == ["first", "second"] and pool.free == 1


async def test_a_run_that_leaves_the_line_or_is_cancelled_leaks_no_slot():
    pool = SlotPool([Slot(0), Slot(1)])
    async with pool.queue() as turn:
        pass  # left (a rejected patch) whether or not its slot had come
    assert pool.free == 2
    async with pool.queue() as held_a, pool.queue() as held_b:
        assert {await held_a.slot(), await held_b.slot()} == {Slot(0), Slot(1)}
        waiter_entered = asyncio.Event()

        async def wait_forever() -> None:
            async with pool.queue() as turn:
                waiter_entered.set()
                await turn.slot()

        waiter = asyncio.create_task(wait_forever())
        await waiter_entered.wait()
        waiter.cancel()  # a runner stopping while a run waits for a slot
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert pool.free == 2
    async with pool.queue() as turn:
        assert await turn.slot() is not None


async def test_a_stopping_runner_starts_nothing_even_with_a_slot_free():
    pool, stop = SlotPool([Slot(0)]), asyncio.Event()
    async with pool.queue(stop) as holder:
        assert await holder.slot() == Slot(0)
        async with pool.queue(stop) as waiting:
            stop.set()  # SIGTERM while the next run waits
            assert await waiting.slot() is None
    assert pool.free == 1
    async with pool.queue(stop) as late:  # fetched just before the stop
        assert await late.slot() is None
    assert pool.free == 1


def test_container_commands_isolate_the_run():
    run = ContainerRun(
        image="ghcr.io/x/run:1",
        workspace=Path("/data/ws"),
        mounts=(Path("/data/run"),),
        devices=("2", "3"),
        memory_bytes=8 << 30,
        max_processes=256,
        env={"GROUNDLOOP_SEED": "1", "CUDA_VISIBLE_DEVICES": "2,3"},
        name="run-1",
    )
    docker = backend_for("docker").command(run, ["python", "train.py"])
    assert docker[:2] == ["docker", "run"] and docker[-3:] == [
        "ghcr.io/x/run:1",
        "python",
        "train.py",
    ]
    flags = " ".join(docker)
    for expected in (
        "--network none",
        f"--memory {8 << 30}",
        "--pids-limit 256",
        '--gpus "device=2,3"',
        "--volume /data/ws:/data/ws:rw",
        "--volume /data/run:/data/run:rw",
        "--workdir /data/ws",
        "--env GROUNDLOOP_SEED=1",
        "--env CUDA_VISIBLE_DEVICES=0,1",
    ):
        assert expected in flags, expected
    podman = " ".join(backend_for("podman").command(run, ["python", "train.py"]))
    assert (
        "--device nvidia.com/gpu=2 --device nvidia.com/gpu=3" in podman and "--gpus" not in podman
    )
    apptainer = backend_for("apptainer").command(run, ["python", "train.py"])
    flags = " ".join(apptainer)
    assert apptainer[:2] == ["apptainer", "exec"] and "--containall --cleanenv" in flags
    for expected in (
        "--net --network none",
        "--nv",
        "--bind /data/ws:/data/ws:rw",
        "--pwd /data/ws",
        "--env CUDA_VISIBLE_DEVICES=2,3",
        "--pids-limit 256",
    ):
        assert expected in flags, expected
    online = " ".join(
        backend_for("docker").command(ContainerRun("img", Path("/w"), network=True), ["x"])
    )
    assert "--network" not in online and "--gpus" not in online
    assert backend_for("local") is None
    with pytest.raises(ValueError, match="unknown container backend"):
        backend_for("lxc")
