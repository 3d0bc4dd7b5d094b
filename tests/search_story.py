"""One realistic search as events, deterministic, for projection and API tests (and the
projection rebuild benchmark): baseline runs, generations with fresh/explore/exploit ideas,
patches that fail, runs that fail or time out, policy updates, a final re-evaluation."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from groundloop import events as ev

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
DIGEST = "d" * 64
DIFF = "".join(
    f"--- a/train.py\n+++ b/train.py\n@@ -{i},3 +{i},3 @@\n context line {i}\n"
    f"-LEARNING_RATE = 3e-3\n+LEARNING_RATE = {i}e-3\n"
    for i in range(1, 20)
)
IDEA_TEXT = (
    "[Experiment] Replace the cosine schedule with a linear warmup of 200 steps followed by "
    "inverse-square-root decay, and raise the peak learning rate by 1.5x. [Code Changes] In "
    "train.py change get_lr() to compute the warmup then decay; set LEARNING_RATE to 4.5e-3. "
    "The hypothesis is that the short budget favours a higher peak with gentler decay. [End]"
)


class Story:
    """Builds events with increasing occurred_at (one second apart) and deterministic ids."""

    def __init__(self, search_id: str, seed: int = 0):
        self.search_id = search_id
        self.rng = random.Random(f"{search_id}/{seed}")
        self.events: list[ev.Event] = []
        self.clock = T0

    def add(
        self, cause: ev.Event | None, cls: type[ev.Event], producer: str, index: int = 0, **fields
    ):
        self.clock += timedelta(seconds=1)
        if cause is None:
            event = cls(
                event_id=ev.stable_id(self.search_id, cls.TYPE, index),
                search_id=self.search_id,
                producer=producer,
                occurred_at=self.clock,
                **fields,
            )
        else:
            event = cause.derive(cls, producer, index, occurred_at=self.clock, **fields)
        self.events.append(event)
        return event

    def run(
        self,
        cause: ev.Event,
        *,
        run_id: str,
        idea_id: str,
        patch_id: str | None,
        generation: int,
        seed: int,
        purpose: str = "search",
        status: str = "succeeded",
    ) -> float | None:
        self.add(
            cause,
            ev.RunStarted,
            "runner",
            1,
            run_id=run_id,
            patch_id=patch_id,
            idea_id=idea_id,
            runner_id=f"runner-{seed % 2}",
            host="node-a",
            devices=["cpu"],
            seed=seed,
        )
        loss = round(3.3 - self.rng.random() * 0.4, 4) if status == "succeeded" else None
        self.add(
            cause,
            ev.RunCompleted,
            "runner",
            2,
            run_id=run_id,
            patch_id=patch_id,
            idea_id=idea_id,
            generation=generation,
            purpose=purpose,
            status=status,
            metrics={"val_loss": loss, "tokens": 1.5e6} if loss else {},
            score=loss,
            reward=round(1 / loss, 6) if loss else 0.0,
            seed=seed,
            wall_seconds=88.5,
            log_key=f"logs/{run_id}.txt",
            error_tail=None if loss else "RuntimeError: CUDA out of memory\n" * 3,
            reason=None if loss else f"run {status}",
            provenance=ev.Provenance(
                environment_digest=DIGEST,
                patched_digest="f" * 64,
                seed=seed,
                python="3.11.9",
                torch="2.13.0",
                hardware="cpu: 2 cores",
                host="node-a",
                isolation={"network": "none"},
            ),
        )
        return loss


def search_story(
    search_id: str = "s1", generations: int = 3, ideas_per_generation: int = 6, seed: int = 0
) -> list[ev.Event]:
    s = Story(search_id, seed)
    start = s.add(
        None,
        ev.SearchStarted,
        "cli",
        environment="tinygpt",
        environment_digest=DIGEST,
        strategy="evolution",
        seed=seed,
        config=ev.SearchConfig(generations=generations, ideas_per_generation=ideas_per_generation),
        proposer=ev.ProposerSettings(kind="knobs"),
        implementer=ev.ImplementerSettings(kind="knobs"),
    )
    baseline = s.add(
        start,
        ev.IdeaProposed,
        "evolver",
        idea_id=ev.stable_id(search_id, "baseline"),
        generation=0,
        mode="baseline",
        title="baseline",
        text="the unmodified recipe",
        proposer=ev.ProposerInfo(kind="baseline"),
    )
    for k in range(2):
        run_id = ev.stable_id(search_id, "baseline-run", k)
        req = s.add(
            baseline,
            ev.RunRequested,
            "evolver",
            10 + k,
            run_id=run_id,
            purpose="baseline",
            idea_id=baseline.idea_id,
            generation=0,
            environment="tinygpt",
            environment_digest=DIGEST,
            seed=k,
        )
        s.run(
            req,
            run_id=run_id,
            idea_id=baseline.idea_id,
            patch_id=None,
            generation=0,
            seed=k,
            purpose="baseline",
        )

    scored: list[tuple[float, str]] = []  # (reward, idea_id) of succeeded ideas
    previous = None
    for g in range(generations):
        exploit = 0 if g == 0 else ideas_per_generation // 2
        parents = [i for _, i in sorted(scored, reverse=True)[:3]]
        gen = s.add(
            start,
            ev.GenerationAdvanced,
            "evolver",
            100 + g,
            generation=g,
            plan=ev.GenerationPlan(
                fresh=ideas_per_generation if g == 0 else 0,
                explore=0 if g == 0 else ideas_per_generation - exploit,
                exploit=exploit,
                exploit_context_ids=parents,
            ),
            previous=previous,
            best_so_far=ev.Scored(idea_id=max(scored)[1], score=max(scored)[0]) if scored else None,
        )
        patched = succeeded = 0
        scores: list[float] = []
        for i in range(ideas_per_generation):
            mode = "fresh" if g == 0 else ("exploit" if i < exploit else "explore")
            idea = s.add(
                gen,
                ev.IdeaProposed,
                "ideator",
                i,
                idea_id=ev.stable_id(search_id, g, i),
                generation=g,
                mode=mode,
                parent_ids=parents[:2] if mode == "exploit" else [],
                title=f"g{g} idea {i}: warmup and decay",
                text=IDEA_TEXT,
                proposer=ev.ProposerInfo(kind="knobs"),
                knobs={"LEARNING_RATE": 3e-3 + i * 1e-4},
                usage=ev.Usage(calls=1, input_tokens=4000, output_tokens=600, cost_usd=0.0),
            )
            if i % 5 == 4:
                s.add(
                    idea,
                    ev.PatchFailed,
                    "implementer",
                    idea_id=idea.idea_id,
                    generation=g,
                    attempts=3,
                    stage="apply",
                    last_error="hunk 2 does not match train.py line 40",
                )
                continue
            patched += 1
            patch = s.add(
                idea,
                ev.PatchReady,
                "implementer",
                patch_id=ev.stable_id(idea.idea_id, "patch"),
                idea_id=idea.idea_id,
                generation=g,
                environment="tinygpt",
                environment_digest=DIGEST,
                diff=DIFF,
                diff_digest="e" * 64,
                patched_digest="f" * 64,
                files_changed=["train.py"],
                implementer=ev.ImplementerInfo(kind="knobs"),
                preflight=ev.PreflightReport(
                    passed=True,
                    checks=[
                        ev.PreflightCheck(name="compile", ok=True, seconds=0.1),
                        ev.PreflightCheck(name="smoke", ok=True, seconds=4.2),
                    ],
                ),
            )
            status = "timed_out" if i % 7 == 3 else "succeeded"
            loss = s.run(
                patch,
                run_id=ev.stable_id(patch.patch_id, 0),
                idea_id=idea.idea_id,
                patch_id=patch.patch_id,
                generation=g,
                seed=0,
                status=status,
            )
            if loss is not None:
                succeeded += 1
                scores.append(loss)
                scored.append((round(1 / loss, 6), idea.idea_id))
        previous = ev.GenerationSummary(
            generation=g,
            ideas=ideas_per_generation,
            patched=patched,
            succeeded=succeeded,
            best_score=min(scores, default=None),
            mean_score=sum(scores) / len(scores) if scores else None,
        )
        s.add(
            gen,
            ev.PolicyUpdated,
            "rl-trainer",
            10_000,
            policy_version=g + 1,
            step=(g + 1) * 10,
            checkpoint_key=f"policies/{search_id}/{g + 1}",
            mean_reward=0.3 + g / 100,
            max_reward=0.31 + g / 100,
            diversity=0.8,
            kl=0.01,
        )

    best_reward, best_idea = max(scored)
    for k in range(2):  # final re-evaluation of the best idea on two more seeds
        run_id = ev.stable_id(best_idea, "reeval", k)
        req = s.add(
            start,
            ev.RunRequested,
            "evolver",
            900 + k,
            run_id=run_id,
            purpose="reeval",
            idea_id=best_idea,
            patch_id=ev.stable_id(best_idea, "patch"),
            generation=generations - 1,
            environment="tinygpt",
            environment_digest=DIGEST,
            seed=10 + k,
        )
        s.run(
            req,
            run_id=run_id,
            idea_id=best_idea,
            patch_id=ev.stable_id(best_idea, "patch"),
            generation=generations - 1,
            seed=10 + k,
            purpose="reeval",
        )
    s.add(
        start,
        ev.SearchCompleted,
        "evolver",
        999,
        reason="generations done",
        best_idea_id=best_idea,
        best_score=round(1 / best_reward, 4),
        baseline_score=3.25,
        totals=ev.Totals(ideas=generations * ideas_per_generation + 1, runs=len(scored) + 4),
        final=[
            ev.FinalEvaluation(
                idea_id=best_idea,
                scores=[3.1, 3.12],
                mean=3.11,
                ci95_low=3.05,
                ci95_high=3.17,
                p_value_vs_baseline=0.01,
            )
        ],
    )
    return s.events
