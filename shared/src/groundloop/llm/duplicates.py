"""The ideator's near-duplicate filter: a new idea is dropped when it nearly repeats one the
search already has (see `DuplicateFilter`), judged on normalised text (lower case, words and
numbers, the bracket template's labels removed)."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable


def normalise(text: str) -> str:
    text = re.sub(r"\[\s*(experiment|code\s+changes?|end)\s*\]", " ", text, flags=re.IGNORECASE)
    return " ".join(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower()))


class DuplicateFilter:
    """Remembers a search's ideas; `reason(text)` says why a new one is a duplicate, or None.

    A new idea is a near duplicate of an earlier one when their word sets have a Jaccard
    similarity >= threshold, or when difflib (no autojunk) rates their normalised texts >=
    threshold (real_quick_ratio, then quick_ratio, then ratio, as difflib advises); the
    earliest such idea is the one reported. Comparing a new idea with every earlier one that
    way cost ~0.3 ms per pair (a SequenceMatcher per pair, and its full ratio whenever two
    English texts have similar letter counts, which is nearly always): 268 ms per new idea
    at 1,000 ideas. Here each idea's words, letters (with multiplicity) and 3-grams (with
    multiplicity) are kept as bitsets over ids this filter hands out, so per earlier idea the
    Jaccard similarity and difflib's quick_ratio are computed exactly from two popcounts,
    and ratio is computed only when two exact bounds allow it to reach the threshold:

        difflib's matching blocks are disjoint, in order, and adjacent blocks are merged, so
        with M matched characters there are at most U + 1 blocks, U = la + lb - 2M the
        unmatched characters; each block of s characters holds s - 2 3-grams found at the
        matching place of the other text, so the texts share at least M - 2(U + 1) 3-grams
        (counted with multiplicity), and ratio = 2M / (la + lb) >= t needs M >= t(la + lb)/2;
        the matched characters form a common subsequence, so M <= LCS (bit-parallel, ~0.1 ms).

    The verdicts (and their reasons) are the ones the pairwise comparison gives; only pairs
    that provably cannot meet the threshold are skipped. Per earlier idea a handful of integer
    operations (~2 us) remain, so the cost still grows with the ideas seen, ~1000x slower.
    """

    GRAM = 3  # the bound above is for 3-grams; longer grams make it weaker at t = 0.9

    def __init__(self, existing: Iterable[str] = (), threshold: float = 0.9):
        self.threshold = threshold
        self._exact: set[str] = set()
        self._ids: dict[object, int] = {}  # word / (letter, k) / (3-gram, k) -> bit index
        # One entry per earlier idea, in order: normalised text, its length, and the bitsets
        # of its words, its letters (unary counts) and its 3-grams (unary counts).
        self._seen: list[tuple[str, int, int, int, int]] = []
        self._lcs_masks: list[dict[str, int] | None] = []  # per earlier idea, made when needed
        for text in existing:
            self.add(text)

    def _bits(self, keys: Iterable[object]) -> int:
        """The bitset of `keys`' ids, built in one byte array: or-ing `1 << id` per key cost
        a big integer as wide as the filter's id count per key."""
        ids = self._ids
        indices = []
        for key in keys:
            index = ids.get(key)
            if index is None:
                index = ids[key] = len(ids)
            indices.append(index)
        if not indices:
            return 0
        packed = bytearray(max(indices) // 8 + 1)
        for index in indices:
            packed[index >> 3] |= 1 << (index & 7)
        return int.from_bytes(packed, "little")

    def _features(self, norm: str) -> tuple[str, int, int, int, int]:
        grams = [norm[i : i + self.GRAM] for i in range(len(norm) - self.GRAM + 1)]
        return (
            norm,
            len(norm),
            self._bits(("w", word) for word in set(norm.split())),
            self._bits(_unary("c", norm)),
            self._bits(_unary("g", grams)),
        )

    def add(self, text: str) -> None:
        norm = normalise(text)
        self._exact.add(norm)
        self._seen.append(self._features(norm))
        self._lcs_masks.append(None)

    def reason(self, text: str) -> str | None:
        norm = normalise(text)
        if norm in self._exact:
            return "exact duplicate"
        # Ids handed out for a rejected text stay unused: harmless, and keeps reason() pure
        # of any change to what has been seen.
        _, length, words, letters, grams = self._features(norm)
        t, slack = self.threshold, self.GRAM - 1
        for at, (other, other_length, other_words, other_letters, other_grams) in enumerate(
            self._seen
        ):
            union = (words | other_words).bit_count()
            jaccard = (words & other_words).bit_count() / union if union else 1.0
            if jaccard >= t:
                return f"near duplicate (word overlap {jaccard:.2f})"
            total = length + other_length
            if _ratio(min(length, other_length), total) < t:  # difflib's real_quick_ratio
                continue
            if _ratio((letters & other_letters).bit_count(), total) < t:  # its quick_ratio
                continue
            least_matched = math.floor(t * total / 2)
            if (grams & other_grams).bit_count() < (
                (2 * slack + 1) * least_matched - (total + 1) * slack
            ):
                continue  # too few shared 3-grams for ratio to reach t (see above)
            masks = self._lcs_masks[at]
            if masks is None:  # kept: an idea that gets here once tends to get here again
                masks = self._lcs_masks[at] = _lcs_masks(other)
            if _ratio(_lcs_length(norm, masks, other_length, least_matched), total) < t:
                continue  # difflib's matches form a common subsequence: M <= LCS
            ratio = difflib.SequenceMatcher(None, norm, other, autojunk=False).ratio()
            if ratio >= t:
                return f"near duplicate (text similarity {ratio:.2f})"
        return None

    def copy(self) -> DuplicateFilter:
        """A filter that has seen what this one has; what either admits later stays its own."""
        twin = DuplicateFilter(threshold=self.threshold)
        twin._exact, twin._ids = set(self._exact), dict(self._ids)
        twin._seen, twin._lcs_masks = list(self._seen), list(self._lcs_masks)
        return twin

    def admit(self, text: str) -> str | None:
        """Add `text` unless it duplicates one already seen; returns the reason it was refused."""
        why = self.reason(text)
        if why is None:
            self.add(text)
        return why


def _ratio(matches: int, total: int) -> float:
    """difflib's ratio formula, so a verdict at the threshold is the one difflib gives."""
    return 2.0 * matches / total if total else 1.0


def _lcs_masks(b: str) -> dict[str, int]:
    """Per character, the bitset of its places in `b` (what `_lcs_length` reads `b` by)."""
    masks: dict[str, int] = {}
    for i, ch in enumerate(b):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    return masks


def _lcs_length(a: str, masks: dict[str, int], length_b: int, at_least: int = 0) -> int:
    """The length of the longest common subsequence of `a` and the text b of `masks`
    (`_lcs_masks(b)`, `length_b` = len(b)), bit-parallel (Crochemore et al. 2001): one pass
    over `a` with integer operations on len(b)-bit words, ~10x faster than difflib's ratio
    on idea-sized texts. With `at_least`, it stops as soon as the subsequence cannot reach
    `at_least` and returns a bound below `at_least`: most pairs that get this far fall short.

    The bound, after reading a[:i] with r = len(a) - i characters of `a` left: a common
    subsequence splits where it passes a[:i], at some b[:j], so LCS <= max over j of
    LCS(a[:i], b[:j]) + min(r, len(b) - j). LCS(a[:i], b[:j]) is the number of zero bits of
    `row` below bit j, which grows by at most 1 per j, so the maximum is at j = len(b) - r:
    matches in the last r characters of b count against the characters of `a` still to come.
    (Bounding by LCS(a[:i], b) + r instead stopped late: a short prefix of an idea nearly
    always embeds somewhere in another one over the same words.)"""
    full = (1 << length_b) - 1
    row = full
    for start in range(0, len(a), CHECK_EVERY):
        for ch in a[start : start + CHECK_EVERY]:
            matched = row & masks.get(ch, 0)
            row = ((row + matched) | (row - matched)) & full
        rest = max(len(a) - start - CHECK_EVERY, 0)
        reach = length_b - rest  # the part of b the matches so far may use
        if reach <= 0:
            continue  # every character of b may still be matched: no bound below len(b)
        bound = reach - (row & ((1 << reach) - 1)).bit_count() + rest
        if bound < at_least:
            return bound
    return length_b - row.bit_count()


CHECK_EVERY = 32  # characters of `a` between looks at the bound (each look is 4 integer ops)


def _unary(tag: str, items: Iterable[str]) -> Iterable[tuple[str, str, int]]:
    """(tag, item, k) for the k-th occurrence of each item: the popcount of two such bitsets'
    intersection is the size of the two multisets' intersection."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
        yield tag, item, counts[item]
