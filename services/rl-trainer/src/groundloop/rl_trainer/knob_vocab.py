"""The word vocabulary of the knobs-lm policy, built from an environment's knobs, and the
meaning of its completions as ideas.

Words: <pad> <bos> <eos>, the separators `=` and `;`, each knob's name, and for each knob a grid
of values: GRID_POINTS evenly spaced in the knob's scale (log-spaced for log knobs) from low to
high, three significant digits, ints rounded, duplicates and the default dropped; every choice
of a choice knob and True/False for a bool, minus the default. A completion reads
`LEARNING_RATE = 0.00316 ; WIDTH = 64 <eos>`.

Parsing judges meaning, not grid membership: a value word is valid for a knob when it is of
the knob's type and inside its declared range, so `LEARNING_RATE = 0.0316` is fine even if
0.0316 is another knob's grid point. An idea sets 1 to MAX_KNOBS knobs, each at most once, none
to its baseline value (that would not change anything).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from groundloop.manifest import Knob, Manifest
from groundloop.rl_trainer.policy import IdeaDraft

PAD, BOS, EOS, EQUALS, SEPARATOR = "<pad>", "<bos>", "<eos>", "=", ";"
GRID_POINTS = 8
MAX_KNOBS = 4
KnobValue = float | int | str  # as IdeaProposed.knobs stores them (bools as 0/1)


def value_word(value: object) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _round3(value: float) -> float:
    return float(f"{value:.3g}")


def grid_values(knob: Knob) -> list[object]:
    """The knob's value words' values, in order, without the default."""
    if knob.type == "bool":
        values: list[object] = [False, True]
    elif knob.type == "choice":
        values = list(knob.choices or [])
    else:
        low, high = float(knob.low), float(knob.high)  # type: ignore[arg-type]
        points = []
        for i in range(GRID_POINTS):
            u = i / (GRID_POINTS - 1)
            if knob.scale == "log":
                x = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
            else:
                x = low + u * (high - low)
            points.append(int(round(x)) if knob.type == "int" else _round3(x))
        values = list(dict.fromkeys(points))
    default = knob.default
    return [v for v in values if value_word(v) != value_word(default) and v != default]


@dataclass(frozen=True)
class _Setting:
    knob: Knob
    value: object  # typed: bool, int, float or the choice itself


class KnobVocabulary:
    def __init__(self, manifest: Manifest):
        if not manifest.knobs:
            raise ValueError(
                f"environment {manifest.name} declares no knobs; the knobs-lm policy needs some "
                "([[knobs]] in its manifest.toml) or use an hf:<model> policy"
            )
        self.manifest = manifest
        self.knobs = {k.name: k for k in manifest.knobs}
        self.grids = {k.name: grid_values(k) for k in manifest.knobs}
        words = [PAD, BOS, EOS, EQUALS, SEPARATOR, *self.knobs]
        for grid in self.grids.values():
            words += [value_word(v) for v in grid]
        self.words = list(dict.fromkeys(words))
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.bos_id, self.eos_id = self.ids[PAD], self.ids[BOS], self.ids[EOS]

    def fingerprint(self) -> str:
        return hashlib.sha256(" ".join(self.words).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ tokens

    def encode(self, text: str) -> list[int]:
        """Word ids of `text` (a completion without <eos>); unknown words are refused."""
        out = []
        for word in text.split():
            if word not in self.ids:
                raise ValueError(
                    f"{word!r} is not a word of the knobs-lm vocabulary for {self.manifest.name}; "
                    "write examples as `NAME = value ; NAME = value` (see KnobVocabulary.render)"
                )
            out.append(self.ids[word])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        words = []
        for i in ids:
            if i == self.eos_id:
                break
            words.append(self.words[i] if 0 <= i < len(self.words) else f"<unknown:{i}>")
        return " ".join(words)

    def example_words(self, text: str) -> str:
        """`text` in vocabulary words: as is when every word is known, else read as
        `NAME = value ; ...` with any values (e.g. IdeaProposed.knobs written out, bools as 0/1)
        and rendered with the nearest grid values."""
        if all(word in self.ids for word in text.split()):
            return text
        knobs: dict[str, object] = {}
        for clause in text.split(SEPARATOR):
            name, equals, value = clause.partition(EQUALS)
            if not equals or not name.strip() or not value.strip():
                raise ValueError(
                    f"warm-up example {text!r}: {clause.strip()!r} is not `NAME = value`"
                )
            knobs[name.strip()] = value.strip().strip("'\"")
        return self.render(knobs)

    def render(self, knobs: Mapping[str, object]) -> str:
        """A completion text for a knob idea; each value snaps to the nearest grid word (in
        the knob's scale), so any knob idea of the search can be a warm-up example."""
        clauses = []
        for name, value in knobs.items():
            if name not in self.knobs:
                raise ValueError(f"{name!r} is not a knob of {self.manifest.name}")
            knob, grid = self.knobs[name], self.grids[name]
            if not grid:
                raise ValueError(f"knob {name} has no value besides its default")
            nearest = min(grid, key=lambda v: abs(_unit(knob, v) - _unit(knob, value)))
            clauses.append(f"{name} {EQUALS} {value_word(nearest)}")
        return f" {SEPARATOR} ".join(clauses)

    # ------------------------------------------------------------------ meaning

    def parse(self, text: str) -> IdeaDraft:
        try:
            settings = self._settings(text)
        except ValueError as exc:
            shown = text if len(text) <= 120 else text[:117] + "..."
            return IdeaDraft(
                title="Unparsable knob setting",
                text=f"The policy wrote {shown!r}, which is not a knob idea: {exc}.",
                knobs=None,
                valid=False,
                problem=str(exc),
            )
        return self._describe(settings)

    def _settings(self, text: str) -> list[_Setting]:
        if not text.strip():
            raise ValueError("the completion is empty")
        clauses = [c.split() for c in text.split(SEPARATOR)]
        if len(clauses) > MAX_KNOBS:
            raise ValueError(f"{len(clauses)} settings; an idea changes 1 to {MAX_KNOBS} knobs")
        seen: list[_Setting] = []
        for words in clauses:
            if len(words) != 3 or words[1] != EQUALS:
                raise ValueError(f"{' '.join(words)!r} is not `NAME = value`")
            name, word = words[0], words[2]
            knob = self.knobs.get(name)
            if knob is None:
                raise ValueError(f"{name!r} is not a knob")
            if any(s.knob.name == name for s in seen):
                raise ValueError(f"{name} is set twice")
            value = _typed(knob, word)
            if value_word(value) == value_word(knob.default) or value == knob.default:
                raise ValueError(f"{name} = {word} is already the baseline value")
            seen.append(_Setting(knob, value))
        return seen

    def _describe(self, settings: list[_Setting]) -> IdeaDraft:
        parts = [f"{s.knob.name} to {value_word(s.value)}" for s in settings]
        title = "Set " + (
            parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        )
        details = [
            f"{s.knob.name} in {s.knob.file} from {value_word(s.knob.default)} to "
            f"{value_word(s.value)}" + (f" ({s.knob.description})" if s.knob.description else "")
            for s in settings
        ]
        text = "Change " + "; ".join(details) + ". Every other setting stays at its baseline value."
        knobs: dict[str, KnobValue] = {}
        for s in settings:
            v = s.value
            knobs[s.knob.name] = int(v) if isinstance(v, bool) else v  # type: ignore[assignment]
        return IdeaDraft(title=title, text=text, knobs=knobs, valid=True)


def _typed(knob: Knob, word: str) -> object:
    if knob.type == "bool":
        if word not in ("True", "False"):
            raise ValueError(f"{knob.name} is a bool knob; {word!r} is not True/False")
        return word == "True"
    if knob.type == "choice":
        for choice in knob.choices or []:
            if value_word(choice) == word:
                return choice
        raise ValueError(f"{knob.name} = {word} is not one of its choices {knob.choices}")
    try:
        number = float(word)
    except ValueError:
        raise ValueError(f"{knob.name} is a {knob.type} knob; {word!r} is not a number") from None
    if not math.isfinite(number) or not float(knob.low) <= number <= float(knob.high):  # type: ignore[arg-type]
        raise ValueError(f"{knob.name} = {word} is outside [{knob.low:g}, {knob.high:g}]")
    if knob.type == "int":
        if number != round(number):
            raise ValueError(f"{knob.name} is an int knob; {word} is not a whole number")
        return int(round(number))
    return number


def _unit(knob: Knob, value: object) -> float:
    """Position in [0, 1] along the knob's scale (choices by index, bools 0/1)."""
    if knob.type == "bool":
        return float(str(value).strip().lower() in ("true", "1", "1.0", "yes"))
    if knob.type == "choice":
        choices = [value_word(c) for c in knob.choices or []]
        word = value_word(value)
        if word not in choices:
            raise ValueError(f"{knob.name} = {value!r} is not one of its choices {knob.choices}")
        return choices.index(word) / max(len(choices) - 1, 1)
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{knob.name} is a {knob.type} knob; {value!r} is not a number") from None
    low, high = float(knob.low), float(knob.high)  # type: ignore[arg-type]
    if knob.scale == "log":
        v = max(v, low)
        return (math.log(v) - math.log(low)) / (math.log(high) - math.log(low))
    return (v - low) / (high - low)
