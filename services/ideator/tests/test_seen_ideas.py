"""The duplicate filter carried from one generation to the next (`SeenIdeas`) gives the
verdicts of one built from every idea so far, and what a generation admits into its copy
never leaks into another's."""

from __future__ import annotations

import random

from groundloop.ideator.generation import SeenIdeas
from groundloop.llm.duplicates import DuplicateFilter


def texts(rng: random.Random, n: int) -> list[str]:
    words = "raise lower the learning rate width momentum batch warmup cosine decay".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randrange(3, 25))) for _ in range(n)]


def test_carried_filters_judge_as_fresh_ones_over_generations():
    rng = random.Random(5)
    seen, ideas, admitted = SeenIdeas(), [], []
    for generation in range(6):
        ideas += texts(rng, 20)
        carried = seen.filter("s1", ideas, 0.8)
        fresh = DuplicateFilter(ideas, 0.8)
        for candidate in texts(rng, 30) + [ideas[0], ideas[-1] + " x"] + admitted:
            assert carried.reason(candidate) == fresh.reason(candidate), (generation, candidate)
        # This generation admits new ideas into its copy; the next call must not see them
        # unless the search's log has them (they are not added to `ideas` here).
        admitted = [c for c in texts(rng, 10) if carried.admit(c) is None]


def test_a_list_that_does_not_extend_the_last_is_built_afresh():
    rng = random.Random(6)
    seen = SeenIdeas()
    first = texts(rng, 15)
    seen.filter("s1", first, 0.9)
    other = texts(rng, 15)  # not an extension (another order of events, a fork)
    got = seen.filter("s1", other, 0.9)
    assert got.reason(first[3]) == DuplicateFilter(other, 0.9).reason(first[3])
    assert got.reason(other[3]) == "exact duplicate"
    assert seen.filter("s1", other, 0.75).threshold == 0.75  # another threshold: afresh


def test_copies_are_independent():
    base = DuplicateFilter(["raise the learning rate"], 0.9)
    twin = base.copy()
    assert twin.admit("lower the momentum to 0.5") is None
    assert base.reason("lower the momentum to 0.5") is None  # the original did not see it
    assert twin.reason("lower the momentum to 0.5") == "exact duplicate"
