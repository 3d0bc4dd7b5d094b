"""Diversity measures and reward shaping on hand-made ideas."""

from __future__ import annotations

import pytest

from groundloop.rl_trainer.diversity import (
    collapsed,
    distinct_fraction,
    jaccard,
    mean_pairwise_similarity,
    novelty,
    shaped_rewards,
)


def test_distinct_fraction_ignores_case_and_spacing() -> None:
    ideas = ["Use cosine decay", "use  cosine\ndecay ", "Raise the width", "USE COSINE DECAY"]
    assert distinct_fraction(ideas) == 0.5
    assert distinct_fraction(["a", "b", "c"]) == 1.0
    assert distinct_fraction([]) == 1.0


def test_similarity_is_jaccard_over_word_sets() -> None:
    assert jaccard("raise the learning rate", "lower the learning rate") == pytest.approx(3 / 5)
    assert jaccard("Width, width!", "width") == 1.0  # sets of lower-cased words
    assert jaccard("", "") == 1.0 and jaccard("a", "") == 0.0
    same = ["warm up the model"] * 3
    assert mean_pairwise_similarity(same) == 1.0
    assert mean_pairwise_similarity(["a b", "c d", "a c"]) == pytest.approx((0 + 1 / 3 + 1 / 3) / 3)
    assert mean_pairwise_similarity(["only one"]) == 0.0


def test_novelty_is_distance_to_the_closest_earlier_idea() -> None:
    earlier = ["raise the learning rate", "use a cosine schedule"]
    assert novelty("anything at all", []) == 1.0
    assert novelty("raise the learning rate", earlier) == 0.0
    assert novelty("lower the learning rate", earlier) == pytest.approx(1 - 3 / 5)
    assert novelty("double the width", earlier) == pytest.approx(
        1 - 1 / 6
    )  # shares "the" of 6 words


def test_shaped_rewards_leave_failed_runs_at_zero() -> None:
    texts = ["raise the learning rate", "brand new idea", "brand new idea", "x"]
    earlier = ["raise the learning rate"]
    rewards = [0.5, 0.5, 0.0, 0.2]
    lengths = [10, 400, 400, 50]
    shaped = shaped_rewards(rewards, texts, earlier, 0.1, 0.2, 100, lengths)
    assert shaped[0] == pytest.approx(0.5 + 0.0 + 0.1 * 0.2)  # not novel; 10/100 of the cap
    assert shaped[1] == pytest.approx(0.5 + 0.1 + 0.2)  # fully novel; length capped at 100
    assert shaped[2] == 0.0  # the run failed: no bonus may reward it
    assert shaped[3] == pytest.approx(0.2 + 0.1 + 0.2 * 0.5)
    assert shaped_rewards(rewards, texts, earlier, 0.0, 0.0, 0, lengths) == rewards
    with pytest.raises(ValueError, match="one text and one length per reward"):
        shaped_rewards(rewards, texts[:2], earlier, 0.1, 0.0, 10, lengths)
    with pytest.raises(ValueError, match="length_cap > 0"):
        shaped_rewards(rewards, texts, earlier, 0.0, 0.1, 0, lengths)


def test_collapse_needs_k_low_steps_in_a_row() -> None:
    assert collapsed([0.9, 0.2, 0.1, 0.3], threshold=0.5, k=3)
    assert not collapsed([0.2, 0.1, 0.6, 0.3], threshold=0.5, k=3)
    assert not collapsed([0.1, 0.1], threshold=0.5, k=3)  # not enough history yet
    with pytest.raises(ValueError, match="k >= 1"):
        collapsed([0.1], threshold=0.5, k=0)
