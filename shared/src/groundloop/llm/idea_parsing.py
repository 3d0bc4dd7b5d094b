"""Ideas out of model text, and the duplicate filter that keeps a search's ideas distinct.

Three shapes are accepted, with any chatter around them:

    [Experiment] what to try and why ...           (the paper's format; "[End]" closes an
    [Code Changes] what to change in the code ...   idea; a final idea without [End] is kept
    [End]                                           when its [Code Changes] has text)

    its Markdown renderings, as small models write it: `### Experiment 1: title` headings,
    `**Experiment**:` / `**Code Changes:**` bold labels, numbered lists, `## Idea 2: title`
    headings over labelled parts;

    {"ideas": [{"title": ..., "experiment": ..., "code_changes": ...}, ...]}   or a bare list,
    possibly inside a ```json fence (what structured output returns: prompts.idea_schema()).

An idea that repeats the prompt's format template instead of saying something is rejected,
with the reason (`parse_ideas_report`). Near-duplicates are judged on normalised text (lower
case, words only): the same words, a token Jaccard similarity or a difflib ratio at or above
the threshold.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_IDEA = re.compile(
    r"\[\s*experiment(?:\s*\d+)?\s*\](?P<experiment>.*?)"
    r"\[\s*code\s+changes?\s*\](?P<changes>.*?)"
    r"(?:\[\s*end\s*\]|(?=\[\s*experiment(?:\s*\d+)?\s*\])|\Z)",
    re.IGNORECASE | re.DOTALL,
)
_EXPERIMENT_KEYS = ("experiment", "idea", "description", "hypothesis", "text")
_CHANGES_KEYS = ("code_changes", "code changes", "codechanges", "changes", "implementation")
MIN_EXPERIMENT_CHARS = 15  # shorter than this is not an idea anyone can implement
TITLE_CHARS = 100


@dataclass(frozen=True)
class ParsedIdea:
    title: str
    experiment: str
    code_changes: str

    @property
    def text(self) -> str:
        """The idea as the implementer reads it (the paper's format, without [End])."""
        return f"[Experiment] {self.experiment}\n[Code Changes] {self.code_changes}".rstrip()


def _clean(fragment: str) -> str:
    text = fragment.strip()
    text = re.sub(r"^[\s:*_#\-]+", "", text)  # "**[Experiment]**:" leaves "**:" behind
    text = re.sub(r"[\s*_#]+$", "", text)
    return text.strip()


def make_title(experiment: str) -> str:
    first = experiment.strip().split("\n", 1)[0]
    labelled = re.match(r"^(?:title|name)\s*:\s*(.+)$", first, re.IGNORECASE)
    if labelled:
        first = labelled.group(1)
    sentence = re.split(r"(?<=[.!?])\s", first, maxsplit=1)[0].strip(" *_#:")
    if len(sentence) > TITLE_CHARS:
        sentence = sentence[: TITLE_CHARS - 1].rsplit(" ", 1)[0] + "…"
    return sentence or "untitled idea"


def parse_bracket_format(text: str) -> list[ParsedIdea]:
    ideas = []
    for match in _IDEA.finditer(text):
        experiment, changes = _clean(match.group("experiment")), _clean(match.group("changes"))
        if len(experiment) < MIN_EXPERIMENT_CHARS or not changes:
            continue
        ideas.append(ParsedIdea(make_title(experiment), experiment, changes))
    return ideas


def _json_values(text: str) -> Iterable[object]:
    """Every JSON value that starts at a '{' or '[' in `text` (fenced or not)."""
    decoder = json.JSONDecoder()
    index = 0
    while True:
        starts = [i for i in (text.find("{", index), text.find("[", index)) if i >= 0]
        if not starts:
            return
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            index = start + 1
            continue
        yield value
        index = end


def _pick(item: dict, keys: tuple[str, ...]) -> str:
    lowered = {str(k).lower().strip(): v for k, v in item.items()}
    for key in keys:
        value = lowered.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, list) and value:  # a list of steps
            return "\n".join(f"- {v}" for v in value if isinstance(v, str))
    return ""


def parse_json_format(text: str) -> list[ParsedIdea]:
    for value in _json_values(text):
        items = value.get("ideas") if isinstance(value, dict) else value
        if isinstance(value, dict) and items is None and _pick(value, _EXPERIMENT_KEYS):
            items = [value]  # one idea as a bare object
        if not isinstance(items, list):
            continue
        ideas = []
        for item in items:
            if not isinstance(item, dict):
                continue
            experiment, changes = _pick(item, _EXPERIMENT_KEYS), _pick(item, _CHANGES_KEYS)
            if len(experiment) < MIN_EXPERIMENT_CHARS:
                continue
            title = item.get("title") if isinstance(item.get("title"), str) else None
            ideas.append(
                ParsedIdea(
                    (title or make_title(experiment)).strip()[:TITLE_CHARS],
                    experiment,
                    changes or "(left to the implementer)",
                )
            )
        if ideas:
            return ideas
    return []


# ---------------------------------------------------------------------------- Markdown

_MD_LABEL = re.compile(
    r"^\s*(?:(?:\d+[.)]|[-*+])\s+)?(?P<heading>#{1,6}\s*)?(?P<bold>\*\*|__)?\s*(?P<bracket>\[)?\s*"
    r"(?P<label>experiment|idea|proposal|code\s+changes?|implementation|changes|end)\b"
    r"\s*(?P<num>\d+)?\s*\]?\s*(?P<bold2>\*\*|__)?\s*(?P<colon>[:.\-–—])?\s*(?:\*\*|__)?\s*"
    r"(?P<rest>.*)$",
    re.IGNORECASE,
)
_MD_HEADING = re.compile(r"^\s*#{1,6}\s+(?P<title>.+?)\s*#*\s*$")


def _md_label(line: str) -> tuple[str, str] | None:
    """(kind, rest of the line) for a label line; "Experiment with a bigger batch" is prose."""
    m = _MD_LABEL.match(line)
    if m is None:
        return None
    marked = m["heading"] or m["bold"] or m["bracket"] or m["colon"] or m["num"]
    if not marked:
        return None
    label = m["label"].lower()
    kind = (
        "experiment"
        if label == "experiment"
        else "idea"
        if label in ("idea", "proposal")
        else "end"
        if label == "end"
        else "changes"
    )
    if kind == "idea" and not (m["heading"] or m["num"] or m["bold"]):
        return None  # "Idea: ..." alone reads as prose more often than as a header
    return kind, m["rest"].strip()


@dataclass
class _Draft:
    title: str = ""
    experiment: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    section: str = "experiment"

    def idea(self) -> ParsedIdea | None:
        experiment = _clean("\n".join(self.experiment))
        changes = _clean("\n".join(self.changes))
        if len(experiment) < MIN_EXPERIMENT_CHARS or not changes:
            return None
        title = _clean(self.title).strip("\"'`") or make_title(experiment)
        return ParsedIdea(title[:TITLE_CHARS], experiment, changes)


def parse_markdown_format(text: str) -> list[ParsedIdea]:
    """Ideas written with Markdown headings, bold labels and numbered lists."""
    drafts: list[_Draft] = []
    draft: _Draft | None = None
    pending_title = ""
    for line in text.split("\n"):
        label = _md_label(line)
        kind, rest = label if label else ("", "")
        if kind == "idea":
            draft = _Draft(title=rest)
            drafts.append(draft)
        elif kind == "experiment":
            if draft is None or draft.experiment or draft.changes:
                draft = _Draft(title=pending_title)
                drafts.append(draft)
            pending_title = ""
            draft.section = "experiment"
            if rest:
                draft.experiment.append(rest)
        elif kind == "changes":
            if draft is not None:
                draft.section = "changes"
                if rest:
                    draft.changes.append(rest)
        elif kind == "end":
            draft = None
        elif _MD_HEADING.match(line) and (draft is None or draft.changes):
            pending_title, draft = _MD_HEADING.match(line)["title"], None  # type: ignore[index]
        elif draft is not None:
            (draft.changes if draft.section == "changes" else draft.experiment).append(line)
    return [idea for idea in (d.idea() for d in drafts) if idea is not None]


# ---------------------------------------------------------------------------- the template

# The field descriptions of prompts.FORMAT (and of the earlier prompt): an idea made of them
# is the model copying the template, not an idea. Kept here, next to the check, as words.
TEMPLATE_PHRASES = (
    "what to change and why it should improve",
    "concrete edits to the editable files",
    "names of functions constants values",
    "function names constants values",
    "one paragraph what to change",
)


def template_reason(idea: ParsedIdea) -> str | None:
    """Why `idea` is the prompt's template rather than an idea, or None."""
    for part, name in ((idea.experiment, "[Experiment]"), (idea.code_changes, "[Code Changes]")):
        words = " ".join(re.findall(r"[a-z0-9]+", part.lower()))
        for phrase in TEMPLATE_PHRASES:
            if phrase in words:
                return (
                    f"its {name} part repeats the prompt's format template ({phrase!r}) "
                    "instead of describing a concrete change"
                )
    return None


@dataclass(frozen=True)
class IdeaParse:
    ideas: list[ParsedIdea]
    rejected: list[str]  # one reason per idea-shaped text that was not accepted
    shape: str  # "bracket" | "markdown" | "json" | "none"


def parse_ideas_report(text: str) -> IdeaParse:
    """The ideas in `text` and why any idea-shaped part was rejected. The bracket format wins,
    then Markdown, then JSON (which an answer that is only JSON tries first)."""
    stripped = re.sub(r"^```\w*\s*|\s*```$", "", text.strip())
    parsers = [("bracket", parse_bracket_format), ("markdown", parse_markdown_format)]
    json_first = stripped.startswith(("{", "["))
    parsers.insert(0 if json_first else 2, ("json", parse_json_format))
    for shape, parser in parsers:
        found = parser(text)
        if not found:
            continue
        ideas, rejected = [], []
        for idea in found:
            why = template_reason(idea)
            if why is None:
                ideas.append(idea)
            else:
                rejected.append(f"{idea.title!r}: {why}")
        return IdeaParse(ideas, rejected, shape)
    return IdeaParse([], [], "none")


def parse_ideas(text: str) -> list[ParsedIdea]:
    """Ideas in `text`, in order, without template echoes (see parse_ideas_report)."""
    return parse_ideas_report(text).ideas


# ---------------------------------------------------------------------------- duplicates


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
    on idea-sized texts. With `at_least`, it stops as soon as the part of `a` still unread
    cannot lift the subsequence found so far to `at_least`, and returns that bound (below
    `at_least`): most pairs that get this far fall short, and are seen to early."""
    full = (1 << length_b) - 1
    row = full
    for start in range(0, len(a), 32):
        for ch in a[start : start + 32]:
            matched = row & masks.get(ch, 0)
            row = ((row + matched) | (row - matched)) & full
        bound = length_b - row.bit_count() + max(len(a) - start - 32, 0)
        if bound < at_least:
            return bound
    return length_b - row.bit_count()


def _unary(tag: str, items: Iterable[str]) -> Iterable[tuple[str, str, int]]:
    """(tag, item, k) for the k-th occurrence of each item: the popcount of two such bitsets'
    intersection is the size of the two multisets' intersection."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
        yield tag, item, counts[item]
