"""Reading the paper's released trajectory rows, one at a time, into checked rows or a reason.

The released rows hold ideator_model, executor_model, env, epoch, idea, code_diff and
result, where result is an object keyed by metric name ({"val_loss": 3.21},
{"accuracy": 0.52}); older exports wrote a bare number. `check_row` accepts both shapes and
says why a row cannot be imported (`Skip`) or can be imported only as an idea whose run
failed (`CheckedRow.unscored`), so an import reports every row it did not take as a score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from groundloop import events as ev
from groundloop.execution.diffs import PatchRejected, parse_diff

PAPER_FIELDS = ("ideator_model", "executor_model", "env", "epoch", "idea", "code_diff", "result")
MAX_IMPORTED_DIFF_BYTES = 900_000  # events stay under the bus's 1 MiB limit
UNKNOWN_MODEL = "unknown"


class Skip(Exception):
    """A row that cannot be imported at all; the message says why."""


@dataclass(frozen=True)
class CheckedRow:
    ideator_model: str
    executor_model: str
    env: str
    epoch: int
    idea: str
    code_diff: str
    files_changed: list[str]
    result: float | None  # the environment's metric value; None: imported as a failed run
    unscored: str | None = None  # why result is None, when the row had one to give


@dataclass(frozen=True)
class RowNote:
    row: int  # 1-based position among the rows given (the Nth JSON line of a file)
    reason: str


@dataclass(frozen=True)
class PaperImport:
    """What an import made of the rows: the events to publish and every row it did not take
    as a scored run, with the reason."""

    events: list[ev.Event]
    rows: int
    imported: int
    skipped: list[RowNote] = field(default_factory=list)  # not imported at all
    unscored: list[RowNote] = field(default_factory=list)  # imported; its run recorded failed

    def summary(self) -> str:
        lines = [
            f"{self.rows} rows read: {self.imported} imported "
            f"({self.imported - len(self.unscored)} with a score, "
            f"{len(self.unscored)} as failed runs), {len(self.skipped)} skipped"
        ]
        lines += [f"  skipped row {n.row}: {n.reason}" for n in self.skipped]
        lines += [f"  row {n.row} has no score: {n.reason}" for n in self.unscored]
        return "\n".join(lines)


def check_row(row: Any, metric: str | None) -> CheckedRow:
    """The row's fields, checked; raises Skip. `metric` is the environment's metric name
    (None: imported without an environment; an object result must then have one key)."""
    if not isinstance(row, dict):
        raise Skip(f"expected a JSON object, got {type(row).__name__}")
    missing = [f for f in ("epoch", "idea") if row.get(f) is None]
    if missing:
        raise Skip(
            f"missing field(s) {', '.join(missing)}; the paper's rows have "
            + ", ".join(PAPER_FIELDS)
        )
    idea = row["idea"]
    if not isinstance(idea, str) or not idea.strip():
        raise Skip(f"idea must be non-empty text, got {_short(idea)}")
    epoch = _epoch(row["epoch"])
    diff = row.get("code_diff") or ""
    if not isinstance(diff, str):
        raise Skip(f"code_diff must be text, got {type(diff).__name__}")
    files = _files_changed(diff) if diff else []
    result, unscored = _result(row.get("result"), metric)
    return CheckedRow(
        ideator_model=_model(row.get("ideator_model")),
        executor_model=_model(row.get("executor_model")),
        env=str(row.get("env") or ""),
        epoch=epoch,
        idea=idea,
        code_diff=diff,
        files_changed=files,
        result=result,
        unscored=unscored,
    )


def _epoch(epoch: Any) -> int:
    if isinstance(epoch, str) and epoch.strip().isdigit():  # some exports quote numbers
        return int(epoch)
    if (
        isinstance(epoch, bool)
        or not isinstance(epoch, int | float)
        or not math.isfinite(epoch)
        or int(epoch) != epoch
        or epoch < 0
    ):
        raise Skip(f"epoch must be a non-negative integer, got {_short(epoch)}")
    return int(epoch)


def _model(value: Any) -> str:
    return str(value) if value not in (None, "") else UNKNOWN_MODEL


def _files_changed(diff: str) -> list[str]:
    if len(diff.encode()) > MAX_IMPORTED_DIFF_BYTES:
        raise Skip(f"code_diff is over {MAX_IMPORTED_DIFF_BYTES:,} bytes")
    try:
        patches = parse_diff(diff)
    except PatchRejected as exc:
        raise Skip(f"code_diff is not a readable unified diff: {exc}") from None
    if not patches:
        raise Skip("code_diff has no file section (no '--- a/FILE' / '+++ b/FILE' lines)")
    return list(dict.fromkeys(p.path for p in patches))


def _result(result: Any, metric: str | None) -> tuple[float | None, str | None]:
    """(value, why there is none) of a result given as a number or {metric name: value}."""
    if result is None:
        return None, "no result (null)"
    if isinstance(result, dict):
        if not result:
            return None, "no result ({})"
        if metric is None:
            if len(result) != 1:
                raise Skip(
                    f"result names {len(result)} metrics ({', '.join(map(str, result))}); "
                    "import with --env to say which one is the score"
                )
            metric = str(next(iter(result)))
        if metric not in result:
            raise Skip(
                f"result has metric(s) {', '.join(map(str, result))}, not the environment's "
                f"metric {metric!r}: this row belongs to another environment or metric"
            )
        value = result[metric]
        if value is None:
            return None, f"no result ({metric} is null)"
        return _number(value, f"result[{metric!r}]")
    return _number(result, "result")


def _number(value: Any, where: str) -> tuple[float | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Skip(
            f"{where} must be a number or an object keyed by metric name, got {_short(value)}"
        )
    if not math.isfinite(value):
        return None, f"non-finite result ({where} = {value!r})"
    return float(value), None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
