"""The ideator's duplicate filter gives the verdicts of the plain pairwise comparison it
replaces (every earlier idea: word Jaccard, then difflib's real_quick_ratio, quick_ratio and
ratio), reasons included, on texts built to sit on both sides of the threshold."""

from __future__ import annotations

import difflib
import random

import pytest

from groundloop.llm.duplicates import DuplicateFilter, normalise

WORDS = (
    "learning rate schedule warmup cosine decay momentum width batch gradient clipping weight "
    "noise layer norm residual attention head dropout label smoothing optimizer step loss "
    "validation score anneal restart linear ema shadow bias adaptive moment budget tokens"
).split()


def pairwise_reason(seen: list[str], text: str, threshold: float) -> str | None:
    """The comparison with every earlier idea, as the filter was first written."""
    norm = normalise(text)
    if norm in {normalise(s) for s in seen}:
        return "exact duplicate"
    words = frozenset(norm.split())
    for other in (normalise(s) for s in seen):
        other_words = frozenset(other.split())
        union = words | other_words
        jaccard = len(words & other_words) / len(union) if union else 1.0
        if jaccard >= threshold:
            return f"near duplicate (word overlap {jaccard:.2f})"
        matcher = difflib.SequenceMatcher(None, norm, other, autojunk=False)
        if matcher.real_quick_ratio() >= threshold and matcher.quick_ratio() >= threshold:
            ratio = matcher.ratio()
            if ratio >= threshold:
                return f"near duplicate (text similarity {ratio:.2f})"
    return None


def mutated(rng: random.Random, text: str) -> str:
    """`text` with a few characters or words changed: near the threshold, either side."""
    chars = list(text)
    for _ in range(rng.randrange(0, max(2, len(chars) // 8))):
        i = rng.randrange(len(chars))
        op = rng.random()
        if op < 0.4:
            chars[i] = rng.choice("abcdefghijklmnopqrstuvwxyz ")
        elif op < 0.7:
            del chars[i]
        else:
            chars.insert(i, rng.choice("etaoin "))
    return "".join(chars)


def corpus(seed: int, size: int) -> list[str]:
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(size):
        if texts and rng.random() < 0.5:
            base = rng.choice(texts)
            pick = rng.random()
            if pick < 0.7:
                texts.append(mutated(rng, base))
            elif pick < 0.85:  # the same words in another order: word overlap 1.0
                words = base.split()
                rng.shuffle(words)
                texts.append(" ".join(words))
            else:
                texts.append(base.upper())
        else:
            n = rng.randrange(1, 40)
            texts.append(
                f"[Experiment] {' '.join(rng.choice(WORDS) for _ in range(n))}\n"
                f"[Code Changes] set {rng.choice(WORDS)} to {rng.random():.3f}"
            )
    texts += ["", "   ", "[Experiment] [Code Changes]", "a", "ab", "abc"]
    return texts


@pytest.mark.parametrize(
    ("seed", "threshold"), [(0, 0.9), (1, 0.9), (2, 0.9), (0, 0.75), (0, 0.5), (0, 1.0), (0, 0.0)]
)
def test_same_verdicts_and_reasons_as_the_pairwise_comparison(seed: int, threshold: float):
    texts = corpus(seed, 90)
    fast = DuplicateFilter(texts[:10], threshold=threshold)
    seen = list(texts[:10])
    verdicts = []
    for text in texts[10:]:
        expected = pairwise_reason(seen, text, threshold)
        assert fast.reason(text) == expected, text
        assert fast.admit(text) == expected
        if expected is None:
            seen.append(text)
        verdicts.append(expected)
    # The corpus exercises every path, or this test would prove little.
    if threshold == 0.9:
        assert None in verdicts and "exact duplicate" in verdicts
        assert any(v and "word overlap" in v for v in verdicts)
        assert any(v and "text similarity" in v for v in verdicts)


def test_an_edited_long_idea_is_caught_by_text_similarity_alone():
    base = " ".join(f"token{i}x" for i in range(80))
    edited = base.replace("token", "tokem", 30)  # 30 words differ: word overlap well below 0.9
    seen = DuplicateFilter([base], threshold=0.9)
    why = seen.reason(edited)
    assert why is not None and why.startswith("near duplicate (text similarity")
    assert why == pairwise_reason([base], edited, 0.9)


@pytest.mark.parametrize("threshold", [0.9, 0.75, 0.8, 2 / 3, 0.95])
def test_a_pair_exactly_at_the_threshold_is_not_lost_to_rounding(threshold: float):
    """The C bound is a float score (2 LCS / (la + lb), in percent): a pair whose difflib ratio
    is the threshold itself must still reach difflib and be judged a duplicate."""
    rng = random.Random(7)
    at_threshold = 0
    for n in range(10, 300, 2):
        base = "".join(rng.choice("abcdefgh") for _ in range(n))  # one word: no word overlap
        edited = list(base)
        for place in rng.sample(range(n), round(n * (1 - threshold))):
            edited[place] = "z"
        text = "".join(edited)
        expected = pairwise_reason([base], text, threshold)
        assert DuplicateFilter([base], threshold=threshold).reason(text) == expected, n
        matcher = difflib.SequenceMatcher(None, base, text, autojunk=False)
        at_threshold += matcher.ratio() == threshold
    assert at_threshold >= 5  # the boundary itself was tried, not only pairs near it
