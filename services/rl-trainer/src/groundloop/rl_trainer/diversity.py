"""How diverse a policy's ideas are, and the optional anti-collapse reward shaping.

The paper saw RL from execution reward collapse onto a few easy ideas; these measures make
that visible (PolicyUpdated carries them) and the shaping terms are the fixes it tried.
Similarity is Jaccard similarity of word sets (lower-cased \\w+ words), the paper's diversity
measure: |A ∩ B| / |A ∪ B|, 1.0 for two texts without words. Pure Python, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import combinations

_WORD = re.compile(r"\w+")


def normalise(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.lower().split())


def words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def jaccard(a: str, b: str) -> float:
    wa, wb = words(a), words(b)
    if not wa and not wb:
        return 1.0
    return len(wa & wb) / len(wa | wb)


def distinct_fraction(texts: Sequence[str]) -> float:
    """Distinct normalised texts / texts; 1.0 for no texts (nothing has collapsed)."""
    if not texts:
        return 1.0
    return len({normalise(t) for t in texts}) / len(texts)


def mean_pairwise_similarity(texts: Sequence[str]) -> float:
    """Mean Jaccard similarity over all pairs; 0.0 with fewer than two texts."""
    pairs = list(combinations(texts, 2))
    if not pairs:
        return 0.0
    return sum(jaccard(a, b) for a, b in pairs) / len(pairs)


def novelty(text: str, earlier_texts: Sequence[str]) -> float:
    """1 - the highest similarity to an earlier idea; 1.0 when there is none."""
    if not earlier_texts:
        return 1.0
    return 1.0 - max(jaccard(text, earlier) for earlier in earlier_texts)


def shaped_rewards(
    rewards: Sequence[float],
    texts: Sequence[str],
    earlier_texts: Sequence[str],
    novelty_bonus: float,
    length_bonus: float,
    length_cap: int,
    lengths: Sequence[int],
) -> list[float]:
    """reward + novelty_bonus * novelty(text, earlier_texts) + min(length, cap) / cap *
    length_bonus, where the base reward is > 0; elsewhere the reward unchanged.

    Bonuses only where the run earned something: a failed run (reward 0) must stay at 0, or the
    policy would learn to write novel or long ideas that do not run. Novelty is measured
    against the search's earlier ideas, not the group's other members (the group is judged as
    one batch; its members differ through their own novelty). The length bonus is capped
    (the paper's capped length bonus against collapsing thinking length)."""
    n = len(rewards)
    if len(texts) != n or len(lengths) != n:
        raise ValueError(
            f"shaped_rewards needs one text and one length per reward: {n} rewards, "
            f"{len(texts)} texts, {len(lengths)} lengths"
        )
    if novelty_bonus < 0 or length_bonus < 0:
        raise ValueError("novelty_bonus and length_bonus must be >= 0 (they are bonuses)")
    if length_bonus > 0 and length_cap <= 0:
        raise ValueError(f"a length bonus needs length_cap > 0 tokens (got {length_cap})")
    out = []
    for reward, text, length in zip(rewards, texts, lengths, strict=True):
        if reward <= 0:
            out.append(reward)
            continue
        bonus = novelty_bonus * novelty(text, earlier_texts) if novelty_bonus else 0.0
        if length_bonus:
            bonus += min(max(length, 0), length_cap) / length_cap * length_bonus
        out.append(reward + bonus)
    return out


def collapsed(history: Sequence[float], threshold: float, k: int) -> bool:
    """True when each of the last k distinct fractions is below `threshold` (needs k of them)."""
    if k < 1:
        raise ValueError(f"collapse needs k >= 1 steps (got {k})")
    recent = list(history)[-k:]
    return len(recent) == k and all(value < threshold for value in recent)
