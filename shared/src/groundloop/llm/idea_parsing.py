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
with the reason (`parse_ideas_report`). Near-duplicates are dropped by
`groundloop.llm.duplicates`.
"""

from __future__ import annotations

import json
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
