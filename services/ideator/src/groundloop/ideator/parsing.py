"""Ideas out of model text, and the duplicate filter that keeps a search's ideas distinct.

Two formats are accepted, with any chatter around them:

    [Experiment] what to try and why ...           (the paper's format; "[End]" closes an
    [Code Changes] what to change in the code ...   idea; a final idea without [End] is kept
    [End]                                           when its [Code Changes] has text)

    {"ideas": [{"title": ..., "experiment": ..., "code_changes": ...}, ...]}   or a bare list,
    possibly inside a ```json fence.

Near-duplicates are judged on normalised text (lower case, words only): the same words, a
token Jaccard similarity or a difflib ratio at or above the threshold.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

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


def parse_ideas(text: str) -> list[ParsedIdea]:
    """Ideas in `text`, in order; the bracket format wins when both are present."""
    return parse_bracket_format(text) or parse_json_format(text)


# ---------------------------------------------------------------------------- duplicates


def normalise(text: str) -> str:
    text = re.sub(r"\[\s*(experiment|code\s+changes?|end)\s*\]", " ", text, flags=re.IGNORECASE)
    return " ".join(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower()))


class DuplicateFilter:
    """Remembers a search's ideas; `reason(text)` says why a new one is a duplicate, or None."""

    def __init__(self, existing: Iterable[str] = (), threshold: float = 0.9):
        self.threshold = threshold
        self._seen: list[tuple[str, frozenset[str]]] = []
        self._exact: set[str] = set()
        for text in existing:
            self.add(text)

    def add(self, text: str) -> None:
        norm = normalise(text)
        self._exact.add(norm)
        self._seen.append((norm, frozenset(norm.split())))

    def reason(self, text: str) -> str | None:
        norm = normalise(text)
        if norm in self._exact:
            return "exact duplicate"
        words = frozenset(norm.split())
        for other, other_words in self._seen:
            union = words | other_words
            jaccard = len(words & other_words) / len(union) if union else 1.0
            if jaccard >= self.threshold:
                return f"near duplicate (word overlap {jaccard:.2f})"
            matcher = difflib.SequenceMatcher(None, norm, other, autojunk=False)
            if (
                matcher.real_quick_ratio() >= self.threshold
                and matcher.quick_ratio() >= self.threshold
            ):
                ratio = matcher.ratio()
                if ratio >= self.threshold:
                    return f"near duplicate (text similarity {ratio:.2f})"
        return None

    def admit(self, text: str) -> str | None:
        """Add `text` unless it duplicates one already seen; returns the reason it was refused."""
        why = self.reason(text)
        if why is None:
            self.add(text)
        return why
