"""Knob ideas implemented deterministically: edit the declared module-level constants.

`NAME = value` (or `NAME: type = value`) at module level in the knob's file gets the idea's
value as a Python literal; only the value's characters change (comments and layout stay),
located through the AST, never by a text search that could hit a string or a nested scope.
Names, types and ranges are checked against the manifest first.
"""

from __future__ import annotations

import ast
import io
import json
import math
from collections.abc import Mapping

from groundloop.manifest import Knob, Manifest


class KnobEditError(ValueError):
    """A knob setting that cannot be applied; the message says which and why."""


def literal(knob: Knob, value: object) -> str:
    """`value` as a Python literal of the knob's type, after checking it against the manifest."""
    name = knob.name
    if knob.type == "bool":
        if isinstance(value, str):
            if value.strip().lower() not in ("true", "false", "1", "0"):
                raise KnobEditError(f"{name} is a bool knob; {value!r} is not true/false")
            return "True" if value.strip().lower() in ("true", "1") else "False"
        return "True" if bool(value) else "False"
    if knob.type == "choice":
        for choice in knob.choices or []:
            if choice == value or str(choice) == str(value):
                # Double quotes, as most code writes them; JSON string syntax is valid Python.
                return json.dumps(choice) if isinstance(choice, str) else repr(choice)
        raise KnobEditError(f"{name}={value!r} is not one of its choices {knob.choices}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise KnobEditError(f"{name} is a {knob.type} knob; {value!r} is not a number") from None
    if not math.isfinite(number) or not float(knob.low) <= number <= float(knob.high):  # type: ignore[arg-type]
        raise KnobEditError(
            f"{name}={value!r} is outside its declared range [{knob.low:g}, {knob.high:g}]"
        )
    if knob.type == "int":
        if number != round(number):
            raise KnobEditError(f"{name} is an int knob; {value!r} is not a whole number")
        return str(int(round(number)))
    return repr(number)  # the shortest text that round-trips, e.g. 0.003 or 3e-05


def _offsets(source: str) -> list[int]:
    """Character offset of the start of each line (1-based line numbers index it)."""
    starts, total = [0, 0], 0
    for line in io.StringIO(source).readlines():  # splits at "\n" only, as the tokenizer does
        total += len(line)
        starts.append(total)
    return starts


def set_constants(source: str, values: dict[str, str], filename: str) -> str:
    """`source` with every module-level `NAME = ...` of `values` set to the given literal."""
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as exc:
        raise KnobEditError(f"{filename} does not parse ({exc.msg}, line {exc.lineno})") from None
    lines, starts = io.StringIO(source).readlines(), _offsets(source)
    spans: list[tuple[int, int, str]] = []
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if not isinstance(target, ast.Name) or target.id not in values:
            continue
        found.add(target.id)

        def offset(line: int, col: int) -> int:
            # AST columns count UTF-8 bytes; convert to characters within the line.
            return starts[line] + len(lines[line - 1].encode()[:col].decode())

        # Optional in the ast stubs only for hand-built nodes; ast.parse sets both.
        assert value.end_lineno is not None and value.end_col_offset is not None
        spans.append(
            (
                offset(value.lineno, value.col_offset),
                offset(value.end_lineno, value.end_col_offset),
                values[target.id],
            )
        )
    missing = sorted(set(values) - found)
    if missing:
        raise KnobEditError(
            f"{filename} has no module-level assignment for {missing}; "
            "a knob must be a constant like `NAME = value`"
        )
    for start, end, text in sorted(spans, reverse=True):
        source = source[:start] + text + source[end:]
    return source


def knob_sources(
    manifest: Manifest, sources: dict[str, str], knobs: Mapping[str, object]
) -> dict[str, str]:
    """The editable files after applying `knobs`: path -> new text, for the files they touch."""
    if not knobs:
        raise KnobEditError("the idea sets no knobs")
    by_file: dict[str, dict[str, str]] = {}
    for name, value in knobs.items():
        try:
            knob = manifest.knob(name)
        except KeyError as exc:
            raise KnobEditError(str(exc.args[0])) from None
        by_file.setdefault(knob.file, {})[name] = literal(knob, value)
    after = {}
    for path, values in sorted(by_file.items()):
        if path not in sources:
            raise KnobEditError(f"knob file {path} is not among the editable files")
        after[path] = set_constants(sources[path], values, path)
    return after
