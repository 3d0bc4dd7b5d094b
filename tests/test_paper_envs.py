"""The paper-scale environments (nanogpt, grpo-math) at toy size on CPU, through the run protocol.

What is real here: the manifests, the environments' own code, `groundloop.execution.environment.execute`
(fresh workspace, sandboxed subprocesses, protected evaluation, metrics → Outcome), tiny
training on CPU. Nothing is downloaded: smoke mode builds random tokens, a tiny Qwen2 and a
byte tokenizer in code. GPU checks are marked `gpu` and skipped without CUDA.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from groundloop.execution.applier import make_diff
from groundloop.execution.environment import Environment, execute
from tests.paths import ENVIRONMENTS

NANOGPT, GRPO_MATH = ENVIRONMENTS / "nanogpt", ENVIRONMENTS / "grpo-math"
# Module names the environments share (each has its own data.py, harness.py, ...).
ENV_MODULES = (
    "data",
    "harness",
    "evaluate",
    "model_worker",
    "train",
    "loss",
    "sampler",
    "grader",
    "prepare_data",
    "budget_guard",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@contextmanager
def environment_modules(folder: Path):
    """Import an environment's modules in-process, without clashing with another one's."""
    saved = {name: sys.modules.pop(name) for name in ENV_MODULES if name in sys.modules}
    sys.path.insert(0, str(folder))
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__
    try:
        yield importlib.import_module
    finally:
        sys.dont_write_bytecode = writes_bytecode
        sys.path.remove(str(folder))
        for name in ENV_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def run(
    name: str,
    tmp_path: Path,
    *,
    diff: str | None = None,
    split: str = "val",
    extra_env: dict[str, str] | None = None,
    device: str = "cpu",
    smoke: bool = True,
):
    env = Environment.load(name)
    workspace = tmp_path / "workspace"
    env.materialize(workspace, diff)
    return execute(
        env,
        workspace,
        seed=0,
        split=split,
        device=device,
        run_dir=tmp_path / "run",
        cache_dir=tmp_path / "cache",
        smoke=smoke,
        extra_env=extra_env,
    )


# ----------------------------------------------------------------------------------- manifests
def test_manifests_load_with_the_papers_settings():
    nanogpt, grpo = Environment.load("nanogpt"), Environment.load("grpo-math")
    assert nanogpt.manifest.resource_class == "gpu8" and nanogpt.manifest.resources.gpus == 8
    assert "--nproc_per_node=gpu" in nanogpt.manifest.entrypoint
    metric = nanogpt.manifest.metric
    assert (metric.name, metric.direction, metric.reward, metric.hack_floor) == (
        "val_loss",
        "minimize",
        "1/x",
        2.5,
    )
    assert metric.suspected_hack(2.4) and not metric.suspected_hack(3.28)
    assert metric.to_reward(3.255) == pytest.approx(1 / 3.255)
    assert {k.name for k in nanogpt.manifest.knobs} >= {
        "LEARNING_RATE",
        "WARMUP_ITERS",
        "WARMDOWN_ITERS",
        "WEIGHT_DECAY",
        "BATCH_SIZE",
    }
    assert grpo.manifest.resource_class == "gpu1"
    assert (
        grpo.manifest.metric.name,
        grpo.manifest.metric.direction,
        grpo.manifest.metric.reward,
    ) == ("accuracy", "maximize", "x")
    assert grpo.manifest.budget.wall_seconds == 3600
    assert nanogpt.manifest.editable == ["train.py"]
    assert grpo.manifest.editable == ["train.py", "loss.py", "sampler.py"]
    for env in (nanogpt, grpo):
        assert {"evaluate.py", "data.py", "harness.py"} <= set(env.protected_files)
        assert env.manifest.metric.final_split == "test"
        prompt = env.describe_for_prompt()
        assert "def main" in prompt  # train.py is shown ...
        assert (
            "LEAK_EXIT_CODE" not in prompt and "REL_TOLERANCE" not in prompt
        )  # ... evaluation is not


# ------------------------------------------------------------------------------------- nanogpt
def test_nanogpt_smoke_runs_through_the_protocol(tmp_path):
    result = run("nanogpt", tmp_path)
    outcome = result.outcome
    assert outcome.status == "succeeded", outcome.reason
    # Uniform random tokens over 256 ids: the loss of an untrained toy model is about ln 256.
    assert outcome.score == pytest.approx(math.log(256), abs=0.3)
    assert outcome.reward == pytest.approx(1 / outcome.score)
    assert outcome.metrics["causality_violation"] == 0.0
    assert outcome.metrics["steps"] == 6 and outcome.metrics["eval_tokens"] == 32 * 64
    assert result.evaluate is not None and "val_loss" in result.evaluate.output_tail


def test_nanogpt_causality_probe_rejects_a_planted_future_token_leak(tmp_path):
    source = (NANOGPT / "train.py").read_text()
    leaky = source.replace("is_causal=True", "is_causal=False")  # attention sees the future
    assert leaky != source
    result = run("nanogpt", tmp_path, diff=make_diff({"train.py": source}, {"train.py": leaky}))
    assert result.outcome.status == "rejected"
    assert "future-token leak" in result.outcome.reason
    assert result.train.returncode == 0 and result.evaluate.returncode == 3


class _RowMixingLeak(torch.nn.Module):
    """Causal within each row, but each row also sees the next row (its future in the stream)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.model(idx)
        return logits + 0.1 * self.model(torch.roll(idx, shifts=-1, dims=0)).detach()


def test_nanogpt_probe_passes_the_baseline_and_catches_in_row_and_cross_row_leaks(monkeypatch):
    monkeypatch.setenv("GROUNDLOOP_SMOKE", "1")
    with environment_modules(NANOGPT) as load:
        train, evaluate, data = load("train"), load("evaluate"), load("data")
        torch.manual_seed(0)
        model = train.build_model(dict(train.SMOKE_MODEL)).eval()
        tokens = data.eval_tokens("val")
        args = (tokens, data.eval_seq_len(), 8, torch.device("cpu"))
        assert evaluate.probe(model, *args) == 0.0
        with pytest.raises(evaluate.FutureTokenLeak, match="future-token leak"):
            evaluate.probe(_RowMixingLeak(model), *args)
        for block in model.blocks:  # the same planted leak as above, in-process
            monkeypatch.setattr(block.attn, "forward", _non_causal_attention(block.attn))
        with pytest.raises(evaluate.FutureTokenLeak):
            evaluate.probe(model, *args)


def _non_causal_attention(attn):
    def forward(x):
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, attn.n_head, -1).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2)
        )
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False)
        return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))

    return forward


def test_nanogpt_final_mode_stops_at_the_target_and_reports_seconds(tmp_path, monkeypatch):
    """Final check ("time to 3.28") in-process: with a target the toy model already meets, the
    clock stops at its first check and the re-measured model gets seconds_to_target."""
    monkeypatch.setenv("GROUNDLOOP_SMOKE", "1")
    monkeypatch.setenv("GROUNDLOOP_SPLIT", "test")
    monkeypatch.chdir(tmp_path)
    metrics_out = tmp_path / "metrics.json"
    monkeypatch.setenv("GROUNDLOOP_METRICS_OUT", str(metrics_out))
    with environment_modules(NANOGPT) as load:
        harness, train, evaluate = load("harness"), load("train"), load("evaluate")
        monkeypatch.setattr(
            harness, "_LAUNCH_ENV", {"GROUNDLOOP_SPLIT": "test", "NANOGPT_TARGET_VAL_LOSS": "100"}
        )
        model = train.build_model(dict(train.SMOKE_MODEL))
        clock = harness.TrainingClock(torch.device("cpu"))
        assert clock.final and clock.target == 100.0
        stops = [clock.should_stop(step, model) for step in range(harness.SMOKE_STEPS)]
        assert stops.index(True) == harness.SMOKE_VALIDATE_EVERY
        harness.save_checkpoint(model, train.SMOKE_MODEL, step=3, tokens=1536, clock=clock)
        # The ledger the protected guard writes around a real run (tests/test_budgets_nanogpt.py).
        ledger = {"exceeded": None, "wall_seconds": 30.0, "wall_budget": 130.0}
        ledger["outputs"] = {"out/model.pt": load("budget_guard").sha256(evaluate.CHECKPOINT)}
        Path("out/budget_ledger.json").write_text(json.dumps(ledger))
        assert evaluate.main() == 0
    metrics = json.loads(metrics_out.read_text())
    assert metrics["target_reached"] == 1.0 and metrics["target_loss"] == 100.0
    assert 0 < metrics["seconds_to_target"] <= metrics["train_seconds"]


def _write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, len(tokens))
    path.write_bytes(header.tobytes() + tokens.astype(np.uint16).tobytes())


def test_nanogpt_reads_speedrun_shards_and_splits_val_from_test(tmp_path, monkeypatch):
    """The real-data path on tiny fake shards in the speedrun's format (nothing downloaded)."""
    monkeypatch.delenv("GROUNDLOOP_SMOKE", raising=False)
    monkeypatch.setenv("NANOGPT_DATA_DIR", str(tmp_path))
    rng = np.random.default_rng(0)
    with environment_modules(NANOGPT) as load:
        data, train, prepare = load("data"), load("train"), load("prepare_data")
        monkeypatch.setattr(data, "EVAL_TOKENS", 1000)
        val = rng.integers(0, 50257, 2001)
        _write_shard(tmp_path / "fineweb_val_000000.bin", val)
        _write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(100))
        assert data.eval_tokens("val").tolist() == val[:1001].tolist()
        assert data.eval_tokens("test").tolist() == val[1000:2001].tolist()
        assert prepare.main(["--out", str(tmp_path), "--train-shards", "1", "--check"]) == 0
        # Rank 1 of 2 reads every second window: tokens 16..31, then the shard wraps around.
        batches = train.TokenBatches(2, 8, rank=1, world=2, device=torch.device("cpu"), seed=0)
        x, y = batches.next()
        assert x.flatten().tolist() == list(range(16, 32)) and y[0, 0].item() == 17
        (tmp_path / "fineweb_train_000001.bin").write_bytes(b"\0" * 1100)  # truncated header
        with pytest.raises(ValueError, match="not a token shard"):
            data.shard_size(tmp_path / "fineweb_train_000001.bin")
        monkeypatch.setenv("NANOGPT_DATA_DIR", str(tmp_path / "missing"))
        monkeypatch.delenv("GROUNDLOOP_CACHE_DIR", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        with pytest.raises(FileNotFoundError, match="prepare_data.py"):
            data.data_dir()


# ----------------------------------------------------------------------------------- grpo-math
def test_grpo_math_smoke_runs_through_the_protocol(tmp_path):
    result = run("grpo-math", tmp_path)
    outcome = result.outcome
    assert outcome.status == "succeeded", outcome.reason
    assert 0.0 <= outcome.score <= 1.0 and outcome.reward == outcome.score
    assert outcome.metrics["checkpoints"] == 2 and outcome.metrics["problems"] == 8
    assert "step 2 | reward" in result.train.output_tail


def test_grpo_pieces_advantages_clipping_and_a_real_update_changes_the_policy(monkeypatch):
    monkeypatch.setenv("GROUNDLOOP_SMOKE", "1")
    with environment_modules(GRPO_MATH) as load:
        pieces, data = load("loss"), load("data")  # the GRPO pieces live in loss.py
        rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
        advantages = pieces.group_normalized_advantages(rewards, group_size=4)
        assert advantages[:4].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-4)
        assert advantages[4:].tolist() == [0.0] * 4  # an all-correct group teaches nothing

        mask = torch.ones(2, 3)
        old = torch.zeros(2, 3)
        new = torch.full((2, 3), math.log(2.0))  # ratio 2: clipped at 1 + CLIP_RANGE for A > 0
        loss, stats = pieces.policy_loss(new, old, torch.tensor([1.0, -1.0]), mask)
        assert loss.item() == pytest.approx(-(1 + pieces.CLIP_RANGE) * 0.5 + 2.0 * 0.5)
        assert stats["clip_fraction"] == pytest.approx(0.5)

        tokenizer = data.ByteTokenizer()
        batch = pieces.tokenize_rollouts(tokenizer, ["ab", "abc"], ["xy", "z"])
        # The response mask marks exactly the positions whose *target* is a response token.
        targets = batch["input_ids"][:, 1:]
        picked = [
            bytes(t for t, m in zip(row.tolist(), mrow.tolist(), strict=True) if m).decode()
            for row, mrow in zip(targets, batch["response_mask"], strict=True)
        ]
        assert picked == ["xy", "z"]

        policy = data.load_base_model(torch.device("cpu"), torch.float32)
        before = [p.detach().clone() for p in policy.parameters()]
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        log_probs = pieces.token_log_probs(policy, batch["input_ids"], batch["attention_mask"])
        loss, _ = pieces.policy_loss(
            log_probs, log_probs.detach(), torch.tensor([1.0, -1.0]), batch["response_mask"]
        )
        loss.backward()
        optimizer.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


def test_grpo_math_splits_hold_validation_out_of_train(tmp_path, monkeypatch):
    """prepare_data's split logic and data.py's reading of it, on a few fake MATH rows."""
    monkeypatch.delenv("GROUNDLOOP_SMOKE", raising=False)
    monkeypatch.setenv("GRPO_MATH_DIR", str(tmp_path))
    with environment_modules(GRPO_MATH) as load:
        data, prepare = load("data"), load("prepare_data")
        rows = [{"problem": f"Problem {i}", "solution": f"so \\boxed{{{i}}}."} for i in range(20)]
        problems = [prepare.to_problem(row) for row in rows]
        assert problems[7]["answer"] == "7"
        train_split, val_split = prepare.split_train(problems, 5)
        again = prepare.split_train(list(reversed(problems)), 5)
        assert [p["problem"] for p in val_split] == [p["problem"] for p in again[1]]
        assert not {p["problem"] for p in val_split} & {p["problem"] for p in train_split}
        (tmp_path / "Qwen2.5-Math-1.5B").mkdir()
        (tmp_path / "Qwen2.5-Math-1.5B" / "config.json").write_text("{}")
        (tmp_path / "MATH").mkdir()
        for name, split in (("train", train_split), ("val", val_split), ("test", problems[:3])):
            prepare.write_jsonl(tmp_path / "MATH" / f"{name}.jsonl", split)
        assert data.load_problems("val") == val_split
        assert len(data.load_problems("train")) == 15
        assert data.format_prompt("1+1?").endswith("User: 1+1?\nAssistant: <think>")
        with pytest.raises(ValueError, match="unknown split"):
            data.load_problems("MATH-500")


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_nanogpt_one_gpu_short_run_on_synthetic_tokens(tmp_path):
    """The 1-GPU variant: full GPT-2 124M, compiled, bf16, 60 s of training on random tokens."""
    result = run(
        "nanogpt",
        tmp_path,
        device="cuda",
        smoke=False,
        extra_env={
            "NANOGPT_SYNTHETIC_DATA": "1",
            "NANOGPT_TRAIN_SECONDS": "60",
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")[:1],
        },
    )
    assert result.outcome.status == "succeeded", result.outcome.reason
    assert result.outcome.score == pytest.approx(math.log(50257), abs=0.5)  # random tokens
    assert "tokens/s" in result.train.output_tail


@pytest.mark.gpu
@needs_cuda
def test_grpo_math_smoke_on_gpu(tmp_path):
    result = run("grpo-math", tmp_path, device="cuda")
    assert result.outcome.status == "succeeded", result.outcome.reason
