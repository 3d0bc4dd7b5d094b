"""How a model writes its edit, chosen by the model's strength, and how each answer becomes a
unified diff for the strict applier and pre-flight.

- "diff": a unified diff (frontier models write these reliably);
- "search-replace": aider-style SEARCH/REPLACE blocks;
- "whole-file": the complete new text of each changed file; the diff is computed here
  (`make_diff`). Small local models get these right where they get diffs wrong: a 1.5B model
  copied the example diff of the old prompt word for word in 18 of 18 answers, yet wrote 6 of 6
  correct whole files.

Examples in the instructions are built from real lines of the file being edited (with a real
`@@` header from `make_diff`), never from placeholders, and only add a marked comment, so an
answer that repeats the example or the old template is recognised and rejected saying so.
"""

from __future__ import annotations

import difflib
import re
from typing import Literal

from groundloop.execution.applier import PatchRejected, make_diff, search_replace_to_diff
from groundloop.llm.client import ModelSpec, ModelSpecError
from groundloop.llm.limits import is_local

EditFormat = Literal["diff", "search-replace", "whole-file"]
EDIT_FORMATS: tuple[EditFormat, ...] = ("diff", "search-replace", "whole-file")
SMALL_MODEL_BILLIONS = 8.0  # at or below: whole files (the measurements)
EXAMPLE_MARK = "# example edit"
_FALLBACKS: dict[EditFormat, tuple[EditFormat, ...]] = {
    "diff": ("diff", "search-replace", "whole-file"),
    "search-replace": ("search-replace", "whole-file", "diff"),
    "whole-file": ("whole-file", "search-replace", "diff"),
}
# What the earlier prompt's template said; a model that writes these copied the template.
TEMPLATE_LINES = (
    "unchanged context line",
    "-old line",
    "+new line",
    "lines copied exactly from the file",
    "the replacement lines",
    "@@ -10,7 +10,7 @@",
)
_SIZE = re.compile(r"(?<![\d.x])(\d+(?:\.\d+)?)b(?![a-z0-9])")


class AnswerRejected(PatchRejected):
    """An answer that is not a usable edit in any format (an echo, no edit, an incomplete
    file): the next revision asks for another format rather than a fix of this one."""


def default_edit_format(model_spec: str | ModelSpec) -> EditFormat:
    """Whole files for local or small models (an openai-compatible server on this machine, or
    a name saying <= 8B parameters); unified diffs for frontier models."""
    try:
        spec = model_spec if isinstance(model_spec, ModelSpec) else ModelSpec.parse(model_spec)
    except ModelSpecError:
        return "diff"
    if spec.provider == "openai-compatible" and is_local(spec.base_url):
        return "whole-file"
    sizes = [float(m) for m in _SIZE.findall(spec.model.lower())]
    if sizes and max(sizes) <= SMALL_MODEL_BILLIONS:
        return "whole-file"
    return "diff"


def fallback_order(first: EditFormat) -> tuple[EditFormat, ...]:
    return _FALLBACKS[first]


# ---------------------------------------------------------------------------- instructions


def _fence_language(path: str) -> str:
    return {"py": "python", "toml": "toml", "sh": "bash", "json": "json", "yaml": "yaml"}.get(
        path.rsplit(".", 1)[-1], ""
    )


def example_line(text: str) -> int | None:
    """The line an example edits: the first assignment, else the first plain code line."""
    lines = text.split("\n")
    for pattern in (r"^[A-Za-z_][\w.]*\s*(?::[^=]+)?=[^=]", r"^\S"):
        for i, line in enumerate(lines):
            stripped = line.strip()
            if re.match(pattern, line) and not stripped.startswith(("#", '"""', "'''", "import ")):
                if not stripped.startswith("from ") and len(stripped) < 120:
                    return i
    return None


def _example_edit(sources: dict[str, str]) -> tuple[str, str, str] | None:
    """(path, the real line, the example's version of it) for the first editable file."""
    for path, text in sources.items():
        index = example_line(text)
        if index is not None:
            line = text.split("\n")[index]
            return path, line, f"{line.rstrip()}  {EXAMPLE_MARK}"
    return None


def format_instructions(edit_format: EditFormat, sources: dict[str, str]) -> str:
    """The prompt's format section, its example made of the files' real lines."""
    example = _example_edit(sources)
    note = (
        f"The example only shows the format (it adds the comment `{EXAMPLE_MARK}`); an answer "
        "that repeats it is rejected. Write the change the idea asks for."
    )
    if edit_format == "whole-file":
        path, text = next(iter(sources.items())) if sources else ("the file", "")
        lines = text.rstrip("\n").split("\n")
        return (
            "Answer with the COMPLETE new text of every file you change, and nothing is applied "
            "but that: for each file, a line holding only its path, then the whole file in a "
            "fenced code block. Write every line of the file, changed or not: no `...` and no "
            "'rest unchanged' comments. Leave out the files you do not change.\n\n"
            f"For example, for {path} write the line `{path}`, then ```{_fence_language(path)} "
            f"on the next line, then all {len(lines)} lines of {path} with your change, from "
            f"its first line `{lines[0].strip()}` to its last line `{lines[-1].strip()}`, "
            "then ``` on a line of its own.\n"
        )
    if example is None:  # no code line to show: the format in words only
        return (
            "Answer with a unified diff in a ```diff block against the files exactly as shown."
            if edit_format == "diff"
            else "Answer with SEARCH/REPLACE blocks, each preceded by the file's path."
        ) + "\n"
    path, line, changed = example
    if edit_format == "search-replace":
        return (
            "Answer with SEARCH/REPLACE blocks (nothing else is applied), each preceded by a "
            "line holding the file's path. SEARCH holds the file's own lines, character for "
            "character (enough of them to match once); REPLACE holds what replaces them. For example:\n\n"
            f"{path}\n<<<<<<< SEARCH\n{line}\n=======\n{changed}\n>>>>>>> REPLACE\n\n{note}\n"
        )
    before = sources[path]
    after = before.replace(line, changed, 1)
    diff = make_diff({path: before}, {path: after}).split("\n")
    shown = "\n".join(row for row in diff if not row.startswith("diff --git")).rstrip("\n")
    return (
        "Answer with a unified diff in a ```diff block (nothing else is applied), against the "
        "files exactly as shown: context lines must match the file, and the numbers in each "
        f"@@ line must count the hunk's lines. For example:\n\n```diff\n{shown}\n```\n\n{note}\n"
    )


# ---------------------------------------------------------------------------- answers

_FENCE = re.compile(r"```[ \t]*(?:diff|patch|udiff)?[ \t]*\n(.*?)```", re.DOTALL)
_ANY_FENCE = re.compile(r"^```[ \t]*([^\n`]*)\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_INNER_FENCE = re.compile(r"^```[ \t]*([^\n`]*\S[^\n`]*)\n", re.MULTILINE)
_ELISION = re.compile(
    r"^\s*(?:#|//)?\s*(?:\.\.\.|…)\s*$|^\s*(?:#|//).*\b(?:rest|remaining|unchanged|same as before)\b",
    re.IGNORECASE,
)


def _echo_reason(text: str) -> str | None:
    for placeholder in TEMPLATE_LINES:
        if re.search(rf"^{re.escape(placeholder)}\s*$", text, re.MULTILINE):
            return (
                "your answer copies the format template from the prompt (the placeholder line "
                f"{placeholder!r}) instead of editing the real lines of the files"
            )
    return None


_MARK_AT_END = re.compile(rf"[ \t]*{re.escape(EXAMPLE_MARK)}[ \t]*$")


def _check_example(diff: str) -> str:
    """An answer that only makes the prompt's example change is rejected; one that makes a
    real change and kept the example's comment on its lines is accepted without the comment
    (small models copy the marker onto their own edits)."""
    rows = diff.split("\n")
    if not any(row.startswith("+") and EXAMPLE_MARK in row for row in rows):
        return diff
    rows = [
        _MARK_AT_END.sub("", r) if r.startswith("+") and not r.startswith("+++") else r
        for r in rows
    ]
    removed = sorted(r[1:] for r in rows if r.startswith("-") and not r.startswith("---"))
    added = sorted(r[1:] for r in rows if r.startswith("+") and not r.startswith("+++"))
    if removed == added:
        marked = next(r for r in diff.split("\n") if r.startswith("+") and EXAMPLE_MARK in r)
        raise AnswerRejected(
            "your answer repeats the example from the prompt's format section (it only adds "
            f"the comment {EXAMPLE_MARK!r}: {marked[1:].strip()!r}); write the change the "
            "idea asks for"
        )
    return "\n".join(rows)


def extract_edit(text: str, sources: dict[str, str], edit_format: EditFormat = "diff") -> str:
    """The unified diff an answer means, in whichever format it was written (the asked-for
    one first). Raises PatchRejected (AnswerRejected for echoes and answers with no edit)
    with a reason the model can act on."""
    echo = _echo_reason(text)
    if echo:
        raise AnswerRejected(echo)
    if edit_format == "whole-file":
        files = parse_whole_files(text, sources)
        if files:
            return _check_example(whole_file_diff(files, sources))
    if re.search(r"^<{5,9} ?SEARCH\s*$", text, re.MULTILINE):
        return _check_example(search_replace_to_diff(sources, text))
    fenced = [
        block for block in _FENCE.findall(text) if re.search(r"^(?:--- |@@ )", block, re.MULTILINE)
    ]
    diff = "\n".join(block.rstrip("\n") for block in fenced) + "\n" if fenced else text
    if re.search(r"^--- ", diff, re.MULTILINE) and re.search(r"^@@ ", diff, re.MULTILINE):
        return _check_example(diff)
    if edit_format != "whole-file":
        files = parse_whole_files(text, sources)
        if files:
            return _check_example(whole_file_diff(files, sources))
        raise AnswerRejected(
            "no unified diff (--- / +++ / @@ lines) and no SEARCH/REPLACE block "
            "found in your answer"
        )
    raise AnswerRejected(
        "no complete file found in your answer: write the file's path on a line of its own, "
        f"then the whole file in a ``` block (editable files: {', '.join(sources)})"
    )


def _header_path(line: str, sources: dict[str, str], allow_new: bool) -> str | None:
    """The path a header line names: `config.py`, `### config.py`, `**config.py**:`,
    `File: config.py`, `# config.py (updated)`."""
    cleaned = re.sub(
        r"^[\s#*>`_-]*(?:(?:file|filename|path|updated)\s*:?\s*)?", "", line.strip(), flags=re.I
    )
    cleaned = re.sub(
        r"\s*\((?:updated|editable|modified|complete|full)[^)]*\)", "", cleaned, flags=re.I
    )
    cleaned = cleaned.strip("`*_: ").strip()
    for path in sources:
        if cleaned == path or cleaned.endswith("/" + path):
            return path
    if allow_new and re.fullmatch(r"[\w.-]+(?:/[\w.-]+)*\.\w+", cleaned):
        return cleaned
    return None


def parse_whole_files(text: str, sources: dict[str, str]) -> dict[str, str]:
    """path -> new text for each complete file in the answer: a header line naming the file
    then a fenced block (or the path in the fence's info string), a header then the file
    unfenced, or a single fenced block when only one file is editable."""
    lines = text.split("\n")
    found: dict[str, str] = {}
    fences = list(_ANY_FENCE.finditer(text))
    for match in fences:
        info, body = match.group(1).strip(), match.group(2)
        before_text = text[: match.start()]
        inner = list(_INNER_FENCE.finditer(body))
        if inner:  # prose (often the prompt repeated) fenced around the real file's fence
            last = inner[-1]
            before_text, info = body[: last.start()], last.group(1).strip()
            body = body[last.end() :]
        if info.lower() in ("diff", "patch", "udiff") or re.search(
            r"^(?:--- a/|@@ -|<{5,9} ?SEARCH)", body, re.MULTILINE
        ):
            continue  # an edit in another format, not a file
        path = None
        for token in info.split():
            path = path or _header_path(token, sources, allow_new=False)
        if path is None:
            before = before_text.rstrip("\n").split("\n")[-2:]
            for line in reversed(before):
                if line.strip():
                    path = _header_path(line, sources, allow_new=True)
                    break
        if path is None and len(fences) == 1 and len(sources) == 1:
            only, original = next(iter(sources.items()))
            if difflib.SequenceMatcher(None, body, original, autojunk=False).quick_ratio() > 0.5:
                path = only
        if path is not None:
            found[path] = body
    if found or fences:
        return found
    headers = [(i, _header_path(line, sources, allow_new=False)) for i, line in enumerate(lines)]
    marks = [(i, p) for i, p in headers if p is not None]
    for n, (i, path) in enumerate(marks):
        end = marks[n + 1][0] if n + 1 < len(marks) else len(lines)
        body = "\n".join(lines[i + 1 : end]).strip("\n")
        if body:
            found[path] = body + "\n"
    return found


def whole_file_diff(files: dict[str, str], sources: dict[str, str]) -> str:
    """The diff from the originals to the answer's files, after checking each is complete."""
    after: dict[str, str] = {}
    for path, body in files.items():
        original = sources.get(path)
        new = body if body.endswith("\n") or not (original or "\n").endswith("\n") else body + "\n"
        if original is not None:
            known = set(original.split("\n"))
            for number, line in enumerate(new.split("\n"), 1):
                if line not in known and _ELISION.search(line):
                    raise AnswerRejected(
                        f"the {path} you wrote is incomplete (line {number}: {line.strip()!r}): "
                        "write every line of the file, changed or not"
                    )
            old_count, new_count = original.count("\n"), new.count("\n")
            if old_count >= 20 and new_count < old_count // 2:
                raise AnswerRejected(
                    f"the {path} you wrote has {new_count} lines where the file has {old_count}: "
                    "write the complete file, every line, not only the changed part"
                )
        after[path] = new
    diff = make_diff({p: sources[p] for p in after if p in sources}, after)
    if not diff.strip():
        raise AnswerRejected(
            "the files in your answer are identical to the originals: nothing was changed; "
            "make the change the idea asks for"
        )
    return diff


def old_lines(answer: str) -> list[tuple[str | None, str]]:
    """(path, line) for each line the answer claims is in a file now: diff context and '-'
    lines, SEARCH lines."""
    out: list[tuple[str | None, str]] = []
    path: str | None = None
    mode = ""
    for row in answer.split("\n"):
        if row.startswith(("--- a/", "+++ b/")):
            path, mode = row[6:].strip(), ""
        elif row.startswith("@@"):
            mode = "hunk"
        elif re.match(r"^<{5,9} ?SEARCH\s*$", row):
            mode = "search"
        elif re.match(r"^={5,9}\s*$", row) or row.startswith("```"):
            mode = "" if mode == "search" or row.startswith("```") else mode
        elif mode == "hunk" and row[:1] in (" ", "-") and not row.startswith("---"):
            out.append((path, row[1:]))
        elif mode == "search":
            out.append((path, row))
        elif mode == "" and row.strip() and " " not in row.strip():
            path = row.strip().strip("`*#: ") or path
    return out


def nearby_real_lines(answer: str, sources: dict[str, str], around: int = 3) -> str:
    """For the first line the answer quotes that is not in its file: the file's real lines
    around the closest match, numbered, so the model sees what is there."""
    for path, line in old_lines(answer):
        text = sources.get(path or "") or (
            next(iter(sources.values())) if len(sources) == 1 else None
        )
        if text is None or not line.strip():
            continue
        real = text.split("\n")
        if line.rstrip() in (r.rstrip() for r in real):
            continue
        name = path if path in sources else next(iter(sources))
        wanted = line.strip()
        # Compare with each real line's start too: `WIDTH = 64` is near `WIDTH = 32  # width`.
        scores = [
            max(
                difflib.SequenceMatcher(None, wanted, r.strip()).ratio(),
                difflib.SequenceMatcher(None, wanted, r.strip()[: len(wanted)]).ratio(),
            )
            for r in real
        ]
        best = max(range(len(real)), key=scores.__getitem__)
        if scores[best] < 0.5:
            return f"Your line {wanted!r} is not in {name}, nor anything like it."
        at = best
        lo, hi = max(0, at - around), min(len(real), at + around + 1)
        shown = "\n".join(f"{n + 1:5d} | {real[n]}" for n in range(lo, hi))
        return (
            f"Your line {line.strip()!r} is not in {name}. The real lines there "
            f"({name}, lines {lo + 1}-{hi}):\n{shown}"
        )
    return ""
