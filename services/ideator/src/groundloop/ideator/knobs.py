"""The offline knob proposer: an evolutionary search over the knobs an environment declares.

No language model is involved, and every idea it writes says so (ProposerInfo kind "knobs").
- fresh (generation 0): change one to three knobs from their defaults, sampled over the
  declared range (log-uniform for log-scale knobs), spread out from the generation's others.
- explore: sample many candidates and keep the one farthest from the ideas in the explore
  context (the paper's "stay away from past ideas"), in normalised knob coordinates.
- exploit: pick parents from the exploit context by tournament on mean reward, recombine two
  of them (uniform crossover) half the time, then mutate one or two knobs: a log-scale step for
  log knobs, a Gaussian step for linear ones, the neighbouring choice for choice knobs, a flip
  for booleans.
Deterministic: the random stream of a slot is seeded by (search seed, generation, slot).
An idea's `knobs` holds every setting that differs from the baseline defaults, because each
patch is made against the baseline code.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from groundloop.ideator.history import IdeaRecord, SearchHistory
from groundloop.manifest import Knob, Manifest

Value = float | int | str | bool
EXPLORE_CANDIDATES = 24
FRESH_CANDIDATES = 8
TRIES = 40  # attempts at a setting the search has not tried before


def _round(value: float) -> float:
    return float(f"{value:.3g}")  # settings an idea states are three significant digits


def fmt(value: Value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, str):
        return repr(value)
    return str(value)


class KnobSpace:
    """Sampling, mutation and coordinates over a manifest's knobs."""

    def __init__(self, knobs: list[Knob]):
        if not knobs:
            raise ValueError(
                "the environment declares no knobs; the knob proposer needs some "
                "(add [[knobs]] to its manifest.toml) or configure a language model"
            )
        self.knobs = {k.name: k for k in knobs}
        self.defaults = {k.name: self.coerce(k, k.default) for k in knobs}

    def coerce(self, knob: Knob, value: object) -> Value:
        """A value as the knob's type (events carry bools as 0/1 and ints may arrive as floats)."""
        if knob.type == "bool":
            return (
                value.strip().lower() in ("1", "true", "yes")
                if isinstance(value, str)
                else bool(value)
            )
        if knob.type == "int":
            return int(round(float(value)))  # type: ignore[arg-type]
        if knob.type == "float":
            return float(value)  # type: ignore[arg-type]
        for choice in knob.choices or []:
            if choice == value or str(choice) == str(value):
                return choice
        raise ValueError(f"{value!r} is not one of {knob.name}'s choices {knob.choices}")

    def full(self, changes: dict[str, object] | None) -> dict[str, Value]:
        settings = dict(self.defaults)
        for name, value in (changes or {}).items():
            if name in self.knobs:
                settings[name] = self.coerce(self.knobs[name], value)
        return settings

    def changes(self, settings: dict[str, Value]) -> dict[str, float | int | str]:
        """The non-default settings, as IdeaProposed.knobs stores them (bools as 0/1)."""
        out: dict[str, float | int | str] = {}
        for name, value in settings.items():
            if value != self.defaults[name]:
                out[name] = int(value) if isinstance(value, bool) else value
        return out

    def key(self, settings: dict[str, Value]) -> tuple:
        return tuple(sorted((n, str(v)) for n, v in settings.items()))

    def unit(self, knob: Knob, value: Value) -> float:
        if knob.type == "bool":
            return float(bool(value))
        if knob.type == "choice":
            choices = knob.choices or [value]
            return choices.index(value) / max(len(choices) - 1, 1)
        low, high, v = float(knob.low), float(knob.high), float(value)  # type: ignore[arg-type]
        if knob.scale == "log":
            return (math.log(v) - math.log(low)) / (math.log(high) - math.log(low))
        return (v - low) / (high - low)

    def coords(self, settings: dict[str, Value]) -> tuple[float, ...]:
        return tuple(self.unit(k, settings[n]) for n, k in self.knobs.items())

    def distance(self, a: dict[str, Value], b: dict[str, Value]) -> float:
        return math.dist(self.coords(a), self.coords(b))

    def _clip(self, knob: Knob, value: float) -> Value:
        value = min(max(value, float(knob.low)), float(knob.high))  # type: ignore[arg-type]
        return int(round(value)) if knob.type == "int" else _round(value)

    def sample(self, knob: Knob, rng: random.Random) -> Value:
        if knob.type == "bool":
            return rng.random() < 0.5
        if knob.type == "choice":
            return rng.choice(knob.choices)  # type: ignore[arg-type]
        low, high = float(knob.low), float(knob.high)  # type: ignore[arg-type]
        if knob.scale == "log":
            return self._clip(knob, math.exp(rng.uniform(math.log(low), math.log(high))))
        return self._clip(knob, rng.uniform(low, high))

    def mutate(self, knob: Knob, value: Value, rng: random.Random) -> Value:
        if knob.type == "bool":
            return not value
        if knob.type == "choice":
            choices = knob.choices or [value]
            i = choices.index(value)
            neighbours = [choices[j] for j in (i - 1, i + 1) if 0 <= j < len(choices)]
            return rng.choice(neighbours) if neighbours else value
        low, high, v = float(knob.low), float(knob.high), float(value)  # type: ignore[arg-type]
        if knob.scale == "log":
            stepped = v * math.exp(rng.gauss(0.0, math.log(high / low) / 8))
        else:
            stepped = v + rng.gauss(0.0, (high - low) / 8)
        new = self._clip(knob, stepped)
        if new == value and knob.type == "int":  # an int step too small to move: move by one
            new = self._clip(knob, v + rng.choice((-1, 1)))
        return new


@dataclass(frozen=True)
class KnobProposal:
    knobs: dict[str, float | int | str]  # non-default settings (IdeaProposed.knobs)
    parent_ids: list[str]
    title: str
    text: str


class KnobProposer:
    """Writes knob ideas for one generation; `propose` is called once per planned slot."""

    def __init__(self, manifest: Manifest, history: SearchHistory, seed: int, generation: int):
        self.manifest, self.history = manifest, history
        self.space = KnobSpace(manifest.knobs)
        self.seed, self.generation = seed, generation
        self.taken = {self.space.key(self.space.defaults)}  # the baseline is not an idea
        self.generation_coords: list[tuple[float, ...]] = []  # this generation's ideas
        self._away: dict[tuple[str, ...], list[tuple[float, ...]]] = {}
        for record in history.proposed():
            if record.knobs is not None:
                self.taken.add(self.space.key(self.settings_of(record)))

    def settings_of(self, record: IdeaRecord) -> dict[str, Value]:
        return self.space.full(record.knobs)  # type: ignore[arg-type]

    def propose(self, slot: int, mode: str, context_ids: list[str]) -> KnobProposal | None:
        """The slot's idea, or None when no untried setting turned up (counted as a drop)."""
        rng = random.Random(f"knobs/{self.seed}/{self.generation}/{slot}")
        parents = self._parents(context_ids) if mode == "exploit" else []
        for _ in range(TRIES):
            if parents:
                settings, used = self._offspring(parents, rng)
            else:
                settings, used = self._spread(mode, context_ids, rng), []
            key = self.space.key(settings)
            if key not in self.taken:
                self.taken.add(key)
                self.generation_coords.append(self.space.coords(settings))
                return self._describe(settings, used)
        return None

    # ------------------------------------------------------------------------- exploit

    def _parents(self, context_ids: list[str]) -> list[IdeaRecord]:
        pool = (
            self.history.ranked(context_ids)
            or self.history.above_baseline()
            or self.history.ranked()
        )
        return [r for r in pool if r.mode != "baseline"]  # the unpatched baseline is no parent

    def _tournament(self, pool: list[IdeaRecord], rng: random.Random) -> IdeaRecord:
        entrants = rng.sample(pool, min(3, len(pool)))
        return max(entrants, key=lambda r: (r.mean_reward, r.idea_id))

    def _offspring(
        self, pool: list[IdeaRecord], rng: random.Random
    ) -> tuple[dict[str, Value], list[IdeaRecord]]:
        first = self._tournament(pool, rng)
        used = [first]
        child = self.settings_of(first)
        others = [r for r in pool if r.idea_id != first.idea_id]
        if others and rng.random() < 0.5:
            second = self._tournament(others, rng)
            used.append(second)
            other = self.settings_of(second)
            child = {n: (child[n] if rng.random() < 0.5 else other[n]) for n in child}
        names = list(self.space.knobs)
        for name in rng.sample(names, 1 if rng.random() < 0.6 or len(names) == 1 else 2):
            child[name] = self.space.mutate(self.space.knobs[name], child[name], rng)
        return child, used

    # ------------------------------------------------------------------------- fresh / explore

    def _spread(self, mode: str, context_ids: list[str], rng: random.Random) -> dict[str, Value]:
        names = list(self.space.knobs)
        if mode == "explore":
            away, count, most = self._context_coords(context_ids), EXPLORE_CANDIDATES, len(names)
        else:
            away, count, most = [], FRESH_CANDIDATES, min(3, len(names))
        away = away + self.generation_coords + [self.space.coords(self.space.defaults)]
        best, best_gap = None, -1.0
        for _ in range(count):
            candidate = dict(self.space.defaults)
            for name in rng.sample(names, rng.randint(1, most)):
                candidate[name] = self.space.sample(self.space.knobs[name], rng)
            point = self.space.coords(candidate)
            gap = min(math.dist(point, other) for other in away)
            if gap > best_gap:
                best, best_gap = candidate, gap
        return best  # type: ignore[return-value]

    def _context_coords(self, context_ids: list[str]) -> list[tuple[float, ...]]:
        key = tuple(context_ids)
        if key not in self._away:
            context = self.history.records(context_ids) or self.history.proposed()
            self._away[key] = [
                self.space.coords(self.settings_of(r)) for r in context if r.knobs is not None
            ]
        return self._away[key]

    # ------------------------------------------------------------------------- words

    def _phrase(self, name: str, old: Value, new: Value) -> str:
        knob = self.space.knobs[name]
        label = "the " + name.lower().replace("_", " ")
        if knob.type == "bool":
            return f"{'enable' if new else 'disable'} {label[4:]} ({name} = {fmt(new)})"
        if knob.type == "choice":
            return f"switch {label} ({name}) from {fmt(old)} to {fmt(new)}"
        verb = "raise" if float(new) > float(old) else "lower"  # type: ignore[arg-type]
        return f"{verb} {label} ({name}) from {fmt(old)} to {fmt(new)}"

    def _describe(self, settings: dict[str, Value], parents: list[IdeaRecord]) -> KnobProposal:
        defaults = self.space.defaults
        changed = [n for n in settings if settings[n] != defaults[n]]
        phrases = [self._phrase(n, defaults[n], settings[n]) for n in changed]
        short = [
            p.split(" (")[0] + " to " + fmt(settings[n])
            if self.space.knobs[n].type != "bool"
            else p.split(" (")[0]
            for p, n in zip(phrases, changed, strict=True)
        ]
        title = ", ".join(short[:2]) + (f" and {len(short) - 2} more" if len(short) > 2 else "")
        title = title[:1].upper() + title[1:]
        files = sorted({self.space.knobs[n].file for n in changed})
        lines = [f"Relative to the baseline, {'; '.join(phrases)} (in {', '.join(files)})."]
        if parents:
            names = " and ".join(f'"{p.title}" ({p.outcome})' for p in parents)
            verb = "Recombines" if len(parents) > 1 else "Mutates"
            lines.append(f"{verb} the settings of {names}.")
        lines.append(
            "Written by the offline knob proposer (no language model): it changes only "
            "the declared constants."
        )
        return KnobProposal(
            self.space.changes(settings), [p.idea_id for p in parents], title[:100], " ".join(lines)
        )
