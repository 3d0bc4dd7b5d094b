"""Does a patch do nothing but set declared knobs to values inside their ranges?

Pre-flight runs the smoke command to catch a patch that crashes or hangs. An environment whose
manifest says `trusted_knobs = true` vouches that every setting of its declared knobs within
their declared ranges runs, so a patch that changes nothing else needs no smoke run: its run
is still isolated and budgeted like any other, and a failure there is recorded as the run's.

"Nothing else" is decided on the syntax tree, not the text: every changed file is a knob's
file, and its module, with the value of each module-level knob assignment blanked, is the
same tree as the original's (comments and layout may differ; code may not). Each new value
must be a literal of the knob's type inside its range (the same check the knob implementer
applies). Anything the check cannot prove (a file that does not parse, a knob set by an
expression, a new file) returns None and the smoke run happens as before.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Mapping

from groundloop.manifest import Manifest

from .knob_edit import KnobEditError, literal


def knob_only_change(
    manifest: Manifest, before: Mapping[str, str], after: Mapping[str, str]
) -> dict[str, str] | None:
    """The knob settings (name -> literal) when `after` differs from `before` only in the
    values of declared knobs, each inside its range; None otherwise. `before`/`after` map
    every editable file to its text (a file missing from one side is a change of its own)."""
    if not manifest.knobs:
        return None
    knobs_by_file: dict[str, set[str]] = {}
    for knob in manifest.knobs:
        knobs_by_file.setdefault(knob.file, set()).add(knob.name)
    settings: dict[str, str] = {}
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        if old is None or new is None or path not in knobs_by_file:
            return None
        changed = _changed_constants(old, new, knobs_by_file[path], path)
        if changed is None:
            return None
        for name, value in changed.items():
            knob = manifest.knob(name)
            if not isinstance(value, _TYPES[knob.type]) or (
                isinstance(value, bool) and knob.type != "bool"
            ):
                return None  # e.g. "0.01" for a float: in range as text, a crash as code
            if knob.type == "choice" and not any(
                c == value and type(c) is type(value) for c in knob.choices or []
            ):
                return None
            try:
                settings[name] = literal(knob, value)
            except KnobEditError:
                return None
    return settings or None


# Python types a knob's literal may have in code (bool is an int: refused for numbers above).
_TYPES: dict[str, type | tuple[type, ...]] = {
    "float": (int, float),
    "int": int,
    "bool": bool,
    "choice": (str, int, float),
}


def _changed_constants(old: str, new: str, names: set[str], path: str) -> dict[str, object] | None:
    """Knob name -> new literal value, if the two modules differ only there; else None."""
    knobs = frozenset(names)
    old_module, new_module = _blanked_original(old, knobs, path), _blanked(new, knobs, path)
    if old_module is None or new_module is None:
        return None
    (old_tree, old_values), (new_tree, new_values) = old_module, new_module
    if old_values.keys() != new_values.keys() or old_tree != new_tree:
        return None  # the trees with knob values blanked differ: code changed
    changed: dict[str, object] = {}
    for name, value in new_values.items():
        if value != old_values[name] or type(value) is not type(old_values[name]):
            if name in changed and changed[name] != value:
                return None  # set twice to different values: not one setting
            changed[name] = value
    return changed


def _blanked(text: str, names: frozenset[str], path: str) -> tuple[str, dict[str, object]] | None:
    """The module's syntax tree (dumped) with knob values blanked, and those values; None when
    it does not parse or sets a knob by anything but a literal."""
    try:
        tree = ast.parse(text, path)
    except SyntaxError:
        return None
    values = _knob_values(tree, names)
    return None if values is None else (ast.dump(tree), values)


# Every candidate of a search is compared with the same original: blank it once (the values
# returned are shared between calls; nothing changes them).
_blanked_original = functools.lru_cache(maxsize=16)(_blanked)


def _knob_values(tree: ast.Module, names: frozenset[str]) -> dict[str, object] | None:
    """The literal value of each module-level knob assignment, blanking it in `tree` so the
    rest of the module can be compared; None when a knob is set by anything but a literal."""
    values: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target = node.target
        else:
            continue
        if not isinstance(target, ast.Name) or target.id not in names:
            continue
        assert node.value is not None  # an Assign always has one; AnnAssign checked above
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
        if target.id in values and values[target.id] != value:
            return None  # assigned twice with different values: which one counts is code
        values[target.id] = value
        node.value = ast.Constant(value=None)
    return values
