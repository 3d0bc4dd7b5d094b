"""`groundloop search --strategy rl|hybrid` end to end: a real nats-server, the real CLI as a
subprocess, the real rl-trainer (a tiny transformers LM trained with GRPO from trl's pieces),
real sandboxed runs of the synthetic environment.

- rl: every generation is one policy step; its ideas are the policy's (mode "rl", proposer
  kind "rl", policy version = step); each step is published once with the group's rewards,
  which are the runs' rewards (0 for a failure); the report shows the RL curves.
- a trainer killed with SIGKILL mid-search (a separate process) resumes from the last
  published checkpoint: no step lost or applied twice, and the same decisions and the same
  checkpoints as the uninterrupted search.
- hybrid: one generation holds both proposers' ideas, and the evolver's context for the next
  generation includes the policy's ideas.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from groundloop import events as ev
from groundloop.broker import NatsServer
from groundloop.settings import Settings
from tests.test_search_e2e import cli_env, log_of, of, search, settings_for
from tests.tiny_hf_model import save_tiny_qwen2
from tests.waiting import eventually_sync

pytest.importorskip("trl", reason="the rl-trainer needs trl: pip install ./services/rl-trainer")

GENERATIONS = 3
RL_ARGS = (
    "--strategy",
    "rl",
    "--generations",
    str(GENERATIONS),
    "--ideas",
    "4",
    "--baseline-seeds",
    "1",
    "--final-top-k",
    "1",
    "--final-seeds",
    "1",
)


@pytest.fixture(scope="module")
def uninterrupted(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory):
    settings = settings_for(nats_server.url, tmp_path_factory.mktemp("rl"), "RL")
    report = search(settings, "rl-e2e", *RL_ARGS, timeout=240)
    return settings, report, log_of(settings, "rl-e2e")


def run_rewards(log: list[ev.Event]) -> dict[str, float]:
    """Each idea's reward as the trainer must see it: its first search run's reward if that
    run succeeded, 0 for a failed run or patch."""
    rewards: dict[str, float] = {}
    for e in log:
        if isinstance(e, ev.RunCompleted) and e.purpose == "search" and e.idea_id:
            rewards.setdefault(e.idea_id, e.reward if e.status == "succeeded" else 0.0)
        elif isinstance(e, ev.PatchFailed):
            rewards.setdefault(e.idea_id, 0.0)
    return rewards


def check_policy_log(log: list[ev.Event]) -> list[ev.PolicyUpdated]:
    """One PolicyUpdated per step, 0..GENERATIONS-1, each trained on its generation's ideas
    with their run rewards; every idea written by the version of its step."""
    updates = of(log, ev.PolicyUpdated)
    assert sorted(u.step for u in updates) == list(range(GENERATIONS))
    rewards = run_rewards(log)
    ideas = [i for i in of(log, ev.IdeaProposed) if i.mode != "baseline"]
    assert ideas and all(i.mode == "rl" and i.proposer.kind == "rl" for i in ideas)
    for update in updates:
        group = sorted(
            (i for i in ideas if i.generation == update.generation), key=lambda i: i.idea_id
        )
        assert update.generation == update.step and update.policy_version == update.step + 1
        assert {i.proposer.policy_version for i in group} == {update.step}
        assert len(group) == update.group_size == 4
        assert sorted(update.rewards) == sorted(rewards.get(i.idea_id, 0.0) for i in group)
        assert update.mean_reward == pytest.approx(sum(update.rewards) / 4)
        assert update.max_reward == max(update.rewards)
        assert update.checkpoint_key and update.checkpoint_digest
        assert update.distinct_fraction is not None and 0 < update.distinct_fraction <= 1
    # Step 0 of the warmed-up policy already writes executable knob ideas.
    first = next(u for u in updates if u.step == 0)
    assert first.valid_fraction is not None and first.valid_fraction >= 0.5
    assert any(r > 0 for u in updates for r in u.rewards)
    return sorted(updates, key=lambda u: u.step)


def test_an_rl_search_trains_one_policy_step_per_generation_and_reports_its_curves(
    uninterrupted,
):
    _, report, log = uninterrupted
    check_policy_log(log)
    assert of(log, ev.SearchCompleted)
    text = (report / "leaderboard.md").read_text()
    assert "## Policy (GRPO from execution reward)" in text
    assert (report / "rl_curves.png").stat().st_size > 10_000


def test_a_trainer_killed_mid_search_resumes_without_losing_or_repeating_a_step(
    nats_server: NatsServer, tmp_path: Path, uninterrupted
):
    settings = settings_for(nats_server.url, tmp_path, "RLKILL")
    cli = subprocess.Popen(
        [sys.executable, "-m", "groundloop.cli.main", "search", "--env", "synthetic"]
        + ["--search-id", "rl-e2e", "--no-trainer", *RL_ARGS],
        env=cli_env(settings),
        stdout=(tmp_path / "cli.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    trainer = start_trainer(settings, tmp_path / "trainer-1.log")
    try:
        # Kill it while step 1 is in flight: its group's ideas are out, results coming in.
        eventually_sync(
            lambda: any(
                isinstance(e, ev.RunCompleted) and e.generation == 1
                for e in log_of(settings, "rl-e2e")
            ),
            timeout=150,
            what="generation 1's first result",
            interval=0.5,
        )
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        trainer = start_trainer(settings, tmp_path / "trainer-2.log")
        assert cli.wait(timeout=200) == 0, (tmp_path / "cli.log").read_text()[-3000:]
    finally:
        for proc in (cli, trainer):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    log = log_of(settings, "rl-e2e")
    resumed = check_policy_log(log)
    clean = check_policy_log(uninterrupted[2])
    # The same decisions as the search that was never interrupted: same ideas, same rewards,
    # the same checkpoints, bit for bit.
    assert [u.checkpoint_digest for u in resumed] == [u.checkpoint_digest for u in clean]
    assert [u.rewards for u in resumed] == [u.rewards for u in clean]


def start_trainer(settings: Settings, log_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "groundloop.rl_trainer"],
        env=cli_env(settings),
        stdout=log_file.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_hybrid_generations_hold_both_proposers_and_evolution_sees_the_policys_ideas(
    nats_server: NatsServer, tmp_path: Path
):
    settings = settings_for(nats_server.url, tmp_path, "HYBRID")
    report = search(
        settings,
        "hybrid-e2e",
        "--strategy",
        "hybrid",
        "--generations",
        "2",
        "--ideas",
        "4",
        "--baseline-seeds",
        "1",
        "--final-top-k",
        "1",
        "--final-seeds",
        "1",
        "--rl",
        "share=0.5",
        timeout=240,
    )
    log = log_of(settings, "hybrid-e2e")
    ideas = of(log, ev.IdeaProposed)
    g0 = {i.proposer.kind for i in ideas if i.generation == 0}
    assert g0 == {"knobs", "rl"}
    policy_ideas = {i.idea_id for i in ideas if i.mode == "rl" and i.generation == 0}
    g1 = next(g for g in of(log, ev.GenerationAdvanced) if g.generation == 1)
    assert g1.plan.rl == 2 and g1.plan.explore + g1.plan.exploit == 2
    context = set(g1.plan.explore_context_ids) | set(g1.plan.exploit_context_ids)
    assert policy_ideas & context, "the evolver's context must include the policy's ideas"
    assert sorted(u.step for u in of(log, ev.PolicyUpdated)) == [0, 1]
    text = (report / "leaderboard.md").read_text()
    assert "Evolution ideas of the same search" in text


def test_rl_flags_are_refused_where_they_cannot_apply(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROUNDLOOP_")}
    env["GROUNDLOOP_DATA_DIR"] = str(tmp_path)
    for args, expected in (
        (["--strategy", "evolution", "--rl", "kl_coef=0.1"], "apply to --strategy rl or hybrid"),
        (["--strategy", "rl", "--rl", "klcoef=0.1"], "KEY one of"),
        (["--strategy", "rl", "--rl", "share=2"], "share"),
        (["--strategy", "annealing"], "valid values"),
    ):
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "groundloop.cli.main", "search", "--env", "synthetic", *args],
            env={**env, "COLUMNS": "250"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert expected in done.stdout + done.stderr, (args, done.stdout, done.stderr)
        assert time.monotonic() - started < 30  # refused before anything starts


def test_a_hugging_face_policy_runs_a_search_and_a_missing_one_stops_it_saying_why(
    nats_server: NatsServer, tmp_path: Path
):
    """The real-model path end to end on a tiny random Qwen2 built here: its free-form ideas
    go through the LLM ideator's parser; without an implementer model none can be patched,
    so every reward is 0, and the steps are still published. A model that is not on disk
    stops the search with the fix in the reason."""
    model = save_tiny_qwen2(tmp_path / "tiny-qwen2")
    settings = settings_for(nats_server.url, tmp_path, "RLHF")
    args = [*RL_ARGS, "--rl-policy", f"hf:{model}", "--rl", "max_new_tokens=24"]
    args[args.index("--generations") + 1] = "2"
    search(settings, "rl-hf", *args, timeout=240)
    log = log_of(settings, "rl-hf")
    updates = of(log, ev.PolicyUpdated)
    assert sorted(u.step for u in updates) == [0, 1]
    ideas = [i for i in of(log, ev.IdeaProposed) if i.mode == "rl"]
    assert len(ideas) == 8 and {i.proposer.model for i in ideas} == {str(model)}
    assert all(r == 0.0 for u in updates for r in u.rewards)

    missing = tmp_path / "no-such-model"
    done = subprocess.run(
        [sys.executable, "-m", "groundloop.cli.main", "search", "--env", "synthetic"]
        + ["--search-id", "rl-missing", "--strategy", "rl", "--rl-policy", f"hf:{missing}"],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout[-3000:]
    assert str(missing) in done.stdout and "huggingface-cli download" in done.stdout
    stopped = of(log_of(settings, "rl-missing"), ev.SearchStopped)
    assert [s.stage for s in stopped] == ["rl-trainer"]
