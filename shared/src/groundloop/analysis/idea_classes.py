"""Hyper-parameter vs algorithmic ideas, read from what a patch changed.

An idea is "hyperparameter" when its patch only changes the right-hand side of module-level
constant assignments (a knob the environment declares, or any UPPER_CASE name) and
"algorithmic" when it changes anything else: a function, a class, an import, a new statement,
a new file. Comments and blank lines never count: the comparison is of syntax trees.

    classify_idea(knobs, diff, sources, knob_names)  -> IdeaClass

Knob ideas (IdeaProposed.knobs set) are hyper-parameter by construction. Otherwise, with the
environment's baseline sources at hand the patch is applied in memory and each changed Python
file's module body is compared statement by statement ("ast"); without them (an environment
not installed here, or a baseline that changed since) the diff's own lines are read ("diff"):
every removed and added line must be `NAME = value` at column 0, and the same names go out
as come in. Ideas with neither knobs nor a patch are "unclassified" here (the LLM judge in
idea_judge.py can still classify their text).
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from groundloop.execution.applier import apply_to_sources
from groundloop.execution.diffs import FilePatch, PatchRejected, parse_diff

ClassLabel = Literal["hyperparameter", "algorithmic", "unclassified"]
CLASS_LABELS: tuple[str, str] = ("hyperparameter", "algorithmic")
_CONSTANT_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclass(frozen=True)
class IdeaClass:
    label: ClassLabel
    method: Literal["knobs", "ast", "diff", "none"]
    reason: str
    constants: tuple[str, ...] = ()  # the constants a hyper-parameter idea changed


def is_constant_name(name: str, knob_names: Collection[str] = ()) -> bool:
    return name in knob_names or _CONSTANT_NAME.match(name) is not None


def classify_idea(
    knobs: Mapping[str, object] | None,
    diff: str | None,
    sources: Mapping[str, str] | None = None,
    knob_names: Collection[str] = (),
) -> IdeaClass:
    """The class of one idea from its knobs, its patch's diff and the baseline sources
    (path -> text of the environment's files; None when the environment is not at hand)."""
    if knobs:
        return IdeaClass("hyperparameter", "knobs", "a knob idea", tuple(sorted(knobs)))
    if not diff:
        return IdeaClass("unclassified", "none", "no patch: nothing to read the class from")
    try:
        patches = parse_diff(diff)
    except PatchRejected as exc:
        return IdeaClass("unclassified", "none", f"the diff does not parse: {exc.reason}")
    for patch in patches:
        if patch.new_file or patch.deleted:
            verb = "creates" if patch.new_file else "deletes"
            return IdeaClass("algorithmic", "diff", f"{verb} {patch.path}")
        if not patch.path.endswith(".py"):
            return IdeaClass("algorithmic", "diff", f"changes {patch.path}, not Python code")
    if sources is not None:
        try:
            changed = apply_to_sources(dict(sources), diff, editable=None)
        except PatchRejected:
            changed = None  # another baseline than this one: read the diff's lines instead
        if changed is not None:
            return _compare_trees(sources, changed, knob_names)
    return _read_diff_lines(patches, knob_names)


# ---------------------------------------------------------------------------- syntax trees


def _compare_trees(
    sources: Mapping[str, str], changed: Mapping[str, str | None], knob_names: Collection[str]
) -> IdeaClass:
    constants: list[str] = []
    for path, after in sorted(changed.items()):
        if after is None:
            return IdeaClass("algorithmic", "ast", f"deletes {path}")
        try:
            before_tree, after_tree = ast.parse(sources[path]), ast.parse(after)
        except SyntaxError as exc:
            return IdeaClass("algorithmic", "ast", f"{path} does not parse ({exc.msg})")
        if len(before_tree.body) != len(after_tree.body):
            return IdeaClass("algorithmic", "ast", f"adds or removes statements in {path}")
        for old, new in zip(before_tree.body, after_tree.body, strict=True):
            if ast.dump(old) == ast.dump(new):
                continue
            name = _constant_assigned(old, knob_names)
            if name is None or name != _constant_assigned(new, knob_names):
                return IdeaClass(
                    "algorithmic", "ast", f"changes code in {path} at line {old.lineno}"
                )
            if _shape(old) != _shape(new):
                return IdeaClass("algorithmic", "ast", f"changes how {name} is declared")
            constants.append(name)
    if not constants:
        return IdeaClass("unclassified", "ast", "changes only comments or blank lines")
    return IdeaClass(
        "hyperparameter", "ast", f"sets {', '.join(constants)}", tuple(sorted(constants))
    )


def _constant_assigned(node: ast.stmt, knob_names: Collection[str]) -> str | None:
    """The name a module-level `NAME = value` (or `NAME: T = value`) assigns, if a constant."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        target = node.target
    else:
        return None
    if isinstance(target, ast.Name) and is_constant_name(target.id, knob_names):
        return target.id
    return None


def _shape(node: ast.stmt) -> str:
    """The statement without its right-hand side: target and annotation."""
    if isinstance(node, ast.AnnAssign):
        return ast.dump(node.target) + ast.dump(node.annotation)
    assert isinstance(node, ast.Assign)
    return ast.dump(node.targets[0])


# ---------------------------------------------------------------------------- diff lines


def _read_diff_lines(patches: list[FilePatch], knob_names: Collection[str]) -> IdeaClass:
    removed: Counter[tuple[str, str]] = Counter()  # (name, value's syntax tree)
    added: Counter[tuple[str, str]] = Counter()
    for patch in patches:
        for hunk in patch.hunks:
            for tag, line in hunk.lines:
                if tag == " " or not line.strip() or line.strip().startswith("#"):
                    continue
                assigned = _constant_line(line, knob_names)
                if assigned is None:
                    return IdeaClass(
                        "algorithmic",
                        "diff",
                        f"changes code in {patch.path}: {line.strip()[:80]!r}",
                    )
                (removed if tag == "-" else added)[assigned] += 1
    if Counter(name for name, _ in removed.elements()) != Counter(
        name for name, _ in added.elements()
    ):
        return IdeaClass("algorithmic", "diff", "adds or removes constants")
    names = tuple(sorted({name for name, _ in (added - removed)}))
    if not names:  # same values, other comments or spacing
        return IdeaClass("unclassified", "diff", "changes only comments or blank lines")
    return IdeaClass("hyperparameter", "diff", f"sets {', '.join(names)}", names)


def _constant_line(line: str, knob_names: Collection[str]) -> tuple[str, str] | None:
    """(NAME, value's syntax tree) when `line` is a whole module-level constant assignment
    at column 0."""
    if line[:1].isspace():
        return None
    try:
        tree = ast.parse(line)
    except SyntaxError:
        return None
    if len(tree.body) != 1:
        return None
    node = tree.body[0]
    name = _constant_assigned(node, knob_names)
    value = getattr(node, "value", None)
    if name is None or value is None:
        return None
    return name, _shape(node) + ast.dump(value)
