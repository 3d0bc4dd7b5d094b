"""The ideator's near-duplicate filter: a new idea is dropped when it nearly repeats one the
search already has (see `DuplicateFilter`), judged on normalised text (lower case, words and
numbers, the bracket template's labels removed)."""

from __future__ import annotations

import difflib
import re
from array import array
from collections.abc import Iterable

import numpy
from rapidfuzz import fuzz, process
from rapidfuzz.distance import LCSseq


def normalise(text: str) -> str:
    text = re.sub(r"\[\s*(experiment|code\s+changes?|end)\s*\]", " ", text, flags=re.IGNORECASE)
    return " ".join(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower()))


class DuplicateFilter:
    """Remembers a search's ideas; `reason(text)` says why a new one is a duplicate, or None.

    A new idea is a near duplicate of an earlier one when their word sets have a Jaccard
    similarity >= threshold, or when difflib (no autojunk) rates their normalised texts >=
    threshold (real_quick_ratio, then quick_ratio, then ratio, as difflib advises; ratio is
    the verdict, the other two are its upper bounds); the earliest such idea is the one
    reported. difflib's ratio costs ~0.3 ms per pair, 268 ms per new idea at 1,000 ideas, so
    it runs only for the pairs an exact bound lets through:

        difflib's matching blocks are disjoint and in order, so its M matched characters form
        a common subsequence: ratio = 2M / (la + lb) <= 2 LCS / (la + lb), the Indel
        similarity rapidfuzz computes bit-parallel in C for every earlier idea at once.

    The verdicts (and their reasons) are the ones the pairwise comparison gives; only pairs
    that provably cannot meet the threshold are skipped. Both passes still read every earlier
    idea, in C: the words shared with each (one count over the ideas that have each word, from
    a word -> ideas index) and the LCS bound (~3.5 us per earlier idea of ~430 characters,
    computed without the GIL, so the event loop of an embedded search runs beside it).
    """

    def __init__(self, existing: Iterable[str] = (), threshold: float = 0.9):
        self.threshold = threshold
        self._exact: set[str] = set()
        self._texts: list[str] = []  # every earlier idea, normalised, in order
        self._sizes = array("q")  # how many distinct words each has
        self._ideas_with: dict[str, array] = {}  # word -> positions of the ideas that have it
        for text in existing:
            self.add(text)

    def add(self, text: str) -> None:
        norm = normalise(text)
        at = len(self._texts)
        self._exact.add(norm)
        self._texts.append(norm)
        words = set(norm.split())
        self._sizes.append(len(words))
        for word in words:
            self._ideas_with.setdefault(word, array("q")).append(at)

    def _word_overlaps(self, words: set[str]) -> numpy.ndarray:
        """The Jaccard similarity of `words` with each earlier idea's word set."""
        count = len(self._texts)
        having = [
            numpy.frombuffer(self._ideas_with[word], dtype=numpy.int64)
            for word in words
            if word in self._ideas_with
        ]
        shared = (
            numpy.bincount(numpy.concatenate(having), minlength=count)
            if having
            else numpy.zeros(count, dtype=numpy.int64)
        )
        union = numpy.frombuffer(self._sizes, dtype=numpy.int64) + len(words) - shared
        return numpy.divide(shared, union, out=numpy.ones(count), where=union > 0)

    def reason(self, text: str) -> str | None:
        norm = normalise(text)
        if norm in self._exact:
            return "exact duplicate"
        if not self._texts:
            return None
        t = self.threshold
        jaccard = self._word_overlaps(set(norm.split()))
        # A hair below t, so no pair is lost to the rounding of a float score; each is then
        # checked in integers. cdist, not extract: it lets go of the GIL while it compares.
        cutoff = min(max(100 * t - 1e-6, 0.0), 100.0)
        scores = process.cdist(
            [norm], self._texts, scorer=fuzz.ratio, score_cutoff=cutoff, dtype=numpy.float64
        )[0]
        for at in numpy.flatnonzero((jaccard >= t) | (scores >= cutoff)).tolist():
            if jaccard[at] >= t:
                return f"near duplicate (word overlap {jaccard[at]:.2f})"
            other = self._texts[at]
            total = len(norm) + len(other)
            if _ratio(LCSseq.similarity(norm, other), total) < t:
                continue  # difflib's matches form a common subsequence: M <= LCS
            ratio = difflib.SequenceMatcher(None, norm, other, autojunk=False).ratio()
            if ratio >= t:
                return f"near duplicate (text similarity {ratio:.2f})"
        return None

    def copy(self) -> DuplicateFilter:
        """A filter that has seen what this one has; what either admits later stays its own."""
        twin = DuplicateFilter(threshold=self.threshold)
        twin._exact, twin._texts, twin._sizes = set(self._exact), list(self._texts), self._sizes[:]
        twin._ideas_with = {word: ideas[:] for word, ideas in self._ideas_with.items()}
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
