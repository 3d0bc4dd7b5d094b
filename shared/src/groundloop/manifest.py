"""An environment's manifest (`environments/<name>/manifest.toml`) as a validated model.

The manifest is the contract between an environment and the rest of groundloop: what the
ideator reads, what the implementer may edit, what the runner executes and for how long, and
how a metric becomes a score and a reward. It lives beside the environment's code but is
itself protected: the time limit and evaluation settings are never in editable files.

Example:

    name = "tinygpt"
    description = "..."                       # what the ideator reads
    entrypoint = ["python", "train.py"]       # run by the runner in the workspace
    evaluate = ["python", "evaluate.py"]      # protected evaluation, a separate step
    editable = ["train.py"]
    protected = ["evaluate.py", "data.py", "manifest.toml"]
    new_files = []                            # globs where new files may be created
    smoke = ["python", "train.py", "--smoke"] # pre-flight, on CPU, seconds
    resource_class = "cpu"
    seeds = [0, 1, 2]

    [metric]
    name = "val_loss"
    direction = "minimize"
    reward = "1/x"                            # "x", "-x" or "1/x"
    hack_floor = 0.5                          # below: rejected as a suspected reward hack
    split = "val"                             # search selects on this split
    final_split = "test"                      # final reports only

    [budget]
    wall_seconds = 90                         # hard cap, enforced by the runner
    grace_seconds = 5
    smoke_seconds = 30
    eval_seconds = 30                         # cap for the protected evaluation step
    tokens = 1_500_000                        # informational: what train.py is held to

    [resources]
    gpus = 0
    cpus = 2
    memory_gb = 4

    trusted_knobs = false                     # true: knob-only patches skip the smoke run

    [[knobs]]
    name = "LEARNING_RATE"                    # a module-level constant in `file`
    file = "train.py"
    type = "float"                            # float | int | choice | bool
    low = 1e-4
    high = 1e-2
    scale = "log"                             # log | linear
    default = 3e-3
"""

from __future__ import annotations

import functools
import math
import tomllib
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MANIFEST_NAME = "manifest.toml"


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Metric(_Strict):
    name: str
    direction: Literal["minimize", "maximize"]
    reward: Literal["x", "-x", "1/x"]
    hack_floor: float | None = None
    hack_ceiling: float | None = None
    split: str = "val"
    final_split: str | None = None

    def to_reward(self, value: float) -> float:
        """The value a learner maximises; callers have already rejected NaN/inf."""
        if self.reward == "x":
            return value
        if self.reward == "-x":
            return -value
        return 1.0 / value if value != 0 else 0.0

    def suspected_hack(self, value: float) -> str | None:
        """Reason a metric is beyond belief (the paper treats losses < 2.5 as hacks)."""
        if self.hack_floor is not None and value < self.hack_floor:
            return f"suspected reward hack: {self.name}={value:.6g} below floor {self.hack_floor}"
        if self.hack_ceiling is not None and value > self.hack_ceiling:
            return (
                f"suspected reward hack: {self.name}={value:.6g} above ceiling {self.hack_ceiling}"
            )
        return None

    def better(self, a: float, b: float) -> bool:
        return a < b if self.direction == "minimize" else a > b


class Budget(_Strict):
    wall_seconds: float = Field(gt=0)
    grace_seconds: float = Field(default=5.0, ge=0)
    smoke_seconds: float = Field(default=60.0, gt=0)
    eval_seconds: float = Field(default=60.0, gt=0)
    tokens: int | None = None
    steps: int | None = None


class Resources(_Strict):
    gpus: int = Field(default=0, ge=0)
    cpus: int = Field(default=1, ge=1)
    memory_gb: float = Field(default=4.0, gt=0)


class Knob(_Strict):
    name: str = Field(pattern=r"^[A-Z][A-Z0-9_]*$")
    file: str
    type: Literal["float", "int", "choice", "bool"]
    low: float | None = None
    high: float | None = None
    scale: Literal["log", "linear"] = "linear"
    choices: list[str | int | float] | None = None
    default: float | int | str | bool
    description: str = ""

    @model_validator(mode="after")
    def _ranges(self) -> Knob:
        if self.type in ("float", "int"):
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"knob {self.name}: numeric knobs need low < high")
            if self.scale == "log" and self.low <= 0:
                raise ValueError(f"knob {self.name}: a log-scale knob needs low > 0")
            if not self.low <= float(self.default) <= self.high:
                raise ValueError(
                    f"knob {self.name}: default {self.default} outside [{self.low}, {self.high}]"
                )
        if self.type == "choice" and (not self.choices or self.default not in self.choices):
            raise ValueError(
                f"knob {self.name}: a choice knob needs `choices` containing the default"
            )
        return self


def _relative_path(value: str) -> str:
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or value.strip() != value or not value:
        raise ValueError(f"{value!r} must be a plain relative path inside the environment")
    return value


class Manifest(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    description: str = Field(min_length=1)
    entrypoint: list[str] = Field(min_length=1)
    evaluate: list[str] | None = None
    editable: list[str] = Field(min_length=1)
    protected: list[str] = []
    new_files: list[str] = []
    smoke: list[str] | None = None
    prepare: list[str] | None = None
    resource_class: Literal["cpu", "gpu1", "gpu8"] = "cpu"
    seeds: list[int] = [0, 1, 2]
    metric: Metric
    budget: Budget
    resources: Resources = Resources()
    knobs: list[Knob] = []
    # The author vouches that every setting of the knobs inside their ranges runs: a patch
    # that only sets knob values in range skips the pre-flight smoke run (its run is still
    # isolated and budgeted). Say so only where it is true.
    trusted_knobs: bool = False

    @field_validator("editable", "protected")
    @classmethod
    def _paths(cls, values: list[str]) -> list[str]:
        return [_relative_path(v) for v in values]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        overlap = set(self.editable) & set(self.protected)
        if overlap:
            raise ValueError(f"files both editable and protected: {sorted(overlap)}")
        if MANIFEST_NAME in self.editable:
            raise ValueError("manifest.toml can never be editable (it holds the time limit)")
        for knob in self.knobs:
            if knob.file not in self.editable:
                raise ValueError(f"knob {knob.name} lives in {knob.file}, which is not editable")
        if self.trusted_knobs and not self.knobs:
            raise ValueError("trusted_knobs = true needs [[knobs]] to trust; declare them")
        for value in (self.metric.hack_floor, self.metric.hack_ceiling):
            if value is not None and not math.isfinite(value):
                raise ValueError("hack_floor/hack_ceiling must be finite numbers")
        return self

    def knob(self, name: str) -> Knob:
        for knob in self.knobs:
            if knob.name == name:
                return knob
        raise KeyError(
            f"{self.name} declares no knob {name!r}; known: {[k.name for k in self.knobs]}"
        )


def load_manifest(path: Path) -> Manifest:
    """Load `path` (a manifest file or an environment folder) with errors that say what to fix."""
    path = path / MANIFEST_NAME if path.is_dir() else path
    if not path.is_file():
        raise ManifestError(
            f"{path}: no such manifest; an environment folder needs {MANIFEST_NAME}"
        )
    return _parsed(path, path.read_text())


# The implementer loads its environment per idea and the runner per run: parsing and
# validating the TOML was 3 % of an embedded search's CPU. A manifest is frozen and this is a
# pure function of the path and the text read just now, so an edited file is parsed afresh.
@functools.lru_cache(maxsize=64)
def _parsed(path: Path, text: str) -> Manifest:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(
            f"{path}: not valid TOML ({exc}); fix the syntax at that line"
        ) from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            hint = (
                "remove it or check its spelling"
                if err["type"] == "extra_forbidden"
                else err["msg"]
            )
            problems.append(f"  {where}: {hint}")
        raise ManifestError(f"{path}: invalid manifest\n" + "\n".join(problems)) from None
