"""Realistic events for tests and benchmarks (one search's worth, deterministic)."""

from __future__ import annotations

from groundloop import events as ev


def search_started(search_id: str = "s1", environment: str = "synthetic", seed: int = 0) -> ev.SearchStarted:
    return ev.SearchStarted(
        event_id=ev.stable_id(search_id, "started"),
        search_id=search_id,
        producer="cli",
        environment=environment,
        environment_digest="d" * 64,
        strategy="evolution",
        config=ev.SearchConfig(generations=2, ideas_per_generation=3),
        proposer=ev.ProposerSettings(kind="knobs"),
        implementer=ev.ImplementerSettings(kind="knobs"),
        seed=seed,
    )


def idea(cause: ev.Event, index: int, generation: int = 0, text_size: int = 400) -> ev.IdeaProposed:
    idea_id = ev.stable_id(cause.search_id, generation, index)
    return cause.derive(
        ev.IdeaProposed, "ideator", index,
        idea_id=idea_id, generation=generation, mode="fresh",
        title=f"idea {index}", text=("raise the learning rate and shorten warmup. " * 20)[:text_size],
        proposer=ev.ProposerInfo(kind="knobs"), knobs={"LEARNING_RATE": 0.003 + index * 1e-4},
    )


def patch_ready(idea_event: ev.IdeaProposed) -> ev.PatchReady:
    return idea_event.derive(
        ev.PatchReady, "implementer",
        patch_id=ev.stable_id(idea_event.idea_id, "patch"), idea_id=idea_event.idea_id,
        generation=idea_event.generation, environment="synthetic", environment_digest="d" * 64,
        diff="--- a/config.py\n+++ b/config.py\n@@ -1 +1 @@\n-X = 1.0\n+X = 2.0\n",
        diff_digest="e" * 64, patched_digest="f" * 64, files_changed=["config.py"],
        implementer=ev.ImplementerInfo(kind="knobs"),
        preflight=ev.PreflightReport(passed=True, checks=[ev.PreflightCheck(name="compile", ok=True)]),
    )


def run_started(patch: ev.PatchReady) -> ev.RunStarted:
    return patch.derive(ev.RunStarted, "runner", run_id=ev.stable_id(patch.patch_id, 0),
                        patch_id=patch.patch_id, idea_id=patch.idea_id, runner_id="r1",
                        host="localhost", seed=0)


def run_completed(patch: ev.PatchReady, score: float) -> ev.RunCompleted:
    return patch.derive(
        ev.RunCompleted, "runner", 1,
        run_id=ev.stable_id(patch.patch_id, 0), patch_id=patch.patch_id, idea_id=patch.idea_id,
        generation=patch.generation, status="succeeded", metrics={"score": score}, score=score,
        reward=score, seed=0, wall_seconds=1.5,
        provenance=ev.Provenance(environment_digest="d" * 64, seed=0, python="3.11", hardware="cpu", host="h"),
    )


def one_search(search_id: str = "s1", ideas: int = 3) -> list[ev.Event]:
    """SearchStarted, GenerationAdvanced, then per idea IdeaProposed → PatchReady → RunStarted
    → RunCompleted, then SearchCompleted."""
    start = search_started(search_id)
    gen = start.derive(ev.GenerationAdvanced, "evolver", generation=0, plan=ev.GenerationPlan(fresh=ideas))
    out: list[ev.Event] = [start, gen]
    for i in range(ideas):
        proposed = idea(gen, i)
        patch = patch_ready(proposed)
        out += [proposed, patch, run_started(patch), run_completed(patch, 1.0 + i)]
    out.append(gen.derive(ev.SearchCompleted, "evolver", 9, reason="generations done",
                          best_score=float(ideas), totals=ev.Totals(ideas=ideas, runs=ideas)))
    return out
