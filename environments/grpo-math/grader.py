"""grpo-math answer grader (protected): is a model's final answer the reference answer?

Consumes a response (text the policy generated after the prompt, which ends in "<think>") and
a reference answer (the MATH solution's last \\boxed{...}). Emits 1.0 or 0.0.

- Extraction: the last <answer>...</answer> block (its \\boxed{} content when it holds one);
  without a closed answer block, the response's last \\boxed{} / \\fbox{}; otherwise nothing.
- Normalisation: LaTeX wrappers (\\text, \\mathrm, \\mbox, \\left/\\right, spacing commands,
  $, \\dfrac/\\tfrac), degrees, percent and dollar signs, trailing units after a number,
  "x = " prefixes, thousands separators, spaces, \\frac12 and \\sqrt2 shorthands, ".5".
- Equivalence: equal normalised strings; numbers (integers, decimals, fractions a/b and
  \\frac{a}{b}) within a relative tolerance of 1e-4; tuples and lists element by element;
  and, when sympy is installed, symbolic equality of short expressions. Only whitelisted
  characters and names ever reach sympy's parser (it evaluates what it parses, and model
  output is untrusted), under a time limit.

`reward(response, answer)` is the paper's r1_zero reward: 1 only when the response has the
"</think> <answer> ... </answer>" format and the answer is right; train.py may shape its own
rewards, but the evaluation scores with `grade`.
"""

from __future__ import annotations

import math
import re
import signal
import threading
from contextlib import contextmanager

REL_TOLERANCE = 1e-4
SYMPY_MAX_CHARS = 80
SYMPY_SECONDS = 2

_UNITS = (
    r"units?|cm|mm|km|meters?|inches|inch|feet|foot|ft|yards?|miles?|mph|degrees?|"
    r"dollars?|cents?|hours?|minutes?|seconds?|days?|weeks?|years?|pounds?|lbs?|"
    r"square|sq|cubic|grams?|kg|liters?|ml|cups?|people|students|ways"
)
_SHORT_UNITS = r"m|g|in"  # only after a space: "2m" may be an algebraic answer
_TEXT_WRAPPERS = re.compile(
    r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"
)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (balanced braces), or `\\boxed 5`."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if i < len(text) and text[i] == " ":
        return re.split(r"[$\s]", text[i + 1 :].lstrip(), maxsplit=1)[0] or None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the response was cut off inside the box


def extract_answer(response: str) -> str | None:
    blocks = re.findall(r"<answer>(.*?)</answer>", response, flags=re.DOTALL)
    if blocks:
        inner = blocks[-1]
        boxed = last_boxed(inner)
        return (boxed if boxed is not None else inner).strip()
    return last_boxed(response)


def _strip_wrappers(s: str) -> str:
    previous = None
    while previous != s:
        previous, s = s, _TEXT_WRAPPERS.sub(r"\1", s)
    return s


def _expand_shorthands(s: str) -> str:
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    return re.sub(r"\\sqrt(\d+|[a-z])", r"\\sqrt{\1}", s)


def normalize(answer: str) -> str:
    s = _strip_wrappers(answer.strip())
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle"):
        s = s.replace(token, "")
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\circ", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = s.replace("{,}", "").replace("\\ ", " ").replace("~", " ")
    s = re.sub(
        rf"(?<=[\d}}])(?:\s*(?:{_UNITS})|\s+(?:{_SHORT_UNITS}))(?:\^\{{?[23]\}}?)?\s*$",
        "",
        s.strip(),
    )
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"^[a-zA-Z]\s*(?:=|\\in)\s*(?=.)", "", s)  # "x = 5" -> "5"; "x \in [1,2]" -> "[1,2]"
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s)
    s = _expand_shorthands(s)
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)
    return s


def to_number(s: str) -> float | None:
    """A normalised answer as a number, for integers, decimals and simple fractions."""
    sign = 1.0
    if s[:1] in "+-" and len(s) > 1:
        sign, s = (-1.0 if s[0] == "-" else 1.0), s[1:]
    if re.fullmatch(r"\d+(\.\d*)?|\.\d+", s):
        return sign * float(s)
    match = re.fullmatch(
        r"\\frac\{([-+]?\d+(?:\.\d+)?)\}\{([-+]?\d+(?:\.\d+)?)\}", s
    ) or re.fullmatch(r"([-+]?\d+(?:\.\d+)?)/([-+]?\d+(?:\.\d+)?)", s)
    if match and float(match.group(2)) != 0:
        return sign * float(match.group(1)) / float(match.group(2))
    return None


def _split_top_level(s: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


@contextmanager
def _time_limit(seconds: int):
    if threading.current_thread() is not threading.main_thread():
        raise TimeoutError("symbolic comparison only runs on the main thread (it needs SIGALRM)")

    def expire(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _latex_to_expression(s: str) -> str | None:
    """Rewrite a short normalised LaTeX answer into a whitelisted sympy expression."""
    if len(s) > SYMPY_MAX_CHARS:
        return None
    previous = None
    while previous != s:
        previous = s
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*").replace("^", "**")
    s = s.replace("{", "(").replace("}", ")")
    if not re.fullmatch(r"[0-9a-z+\-*/().]*", s):
        return None
    names = set(re.findall(r"[a-z]+", s))
    if any(len(name) > 1 and name not in ("sqrt", "pi") for name in names):
        return None
    return s


def _sympy_equal(a: str, b: str) -> bool:
    try:
        import sympy
        from sympy.parsing.sympy_parser import (
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )
    except ImportError:
        return False
    ea, eb = _latex_to_expression(a), _latex_to_expression(b)
    if not ea or not eb:
        return False
    names = set(re.findall(r"[a-z]+", ea + eb)) - {"sqrt", "pi"}
    local = {name: sympy.Symbol(name) for name in names} | {"sqrt": sympy.sqrt, "pi": sympy.pi}
    transformations = standard_transformations + (implicit_multiplication_application,)
    try:
        with _time_limit(SYMPY_SECONDS):
            difference = sympy.simplify(
                parse_expr(ea, local_dict=local, transformations=transformations)
                - parse_expr(eb, local_dict=local, transformations=transformations)
            )
            return difference == 0
    except Exception:  # any parse error, timeout or sympy failure means "not shown equal"
        return False


def _equal_normalized(a: str, b: str) -> bool:
    if a == b:
        return True
    na, nb = to_number(a), to_number(b)
    if na is not None and nb is not None:
        return math.isclose(na, nb, rel_tol=REL_TOLERANCE, abs_tol=1e-9)
    if a[:1] in "([" and a[:1] == b[:1] and a[-1:] in ")]" and a[-1:] == b[-1:]:
        a, b = a[1:-1], b[1:-1]
    parts_a, parts_b = _split_top_level(a), _split_top_level(b)
    if len(parts_a) > 1 and len(parts_a) == len(parts_b):
        return all(_equal_normalized(x, y) for x, y in zip(parts_a, parts_b, strict=True))
    if len(parts_a) == 1 and len(parts_b) == 1:
        return _sympy_equal(a, b)
    return False


def is_equivalent(predicted: str | None, reference: str) -> bool:
    if predicted is None or not predicted.strip():
        return False
    return _equal_normalized(normalize(predicted), normalize(reference))


def grade(response: str, reference: str) -> float:
    """1.0 when the response's final answer equals the reference answer, else 0.0."""
    return 1.0 if is_equivalent(extract_answer(response), reference) else 0.0


def has_format(response: str) -> bool:
    return "</think> <answer>" in response and "</answer>" in response


def reward(response: str, reference: str) -> dict[str, float]:
    """The r1_zero reward: format and answer; the reward needs both."""
    formatted = has_format(response)
    correct = grade(response, reference) if formatted else 0.0
    return {
        "format_reward": float(formatted),
        "answer_reward": correct,
        "reward": correct if formatted else 0.0,
    }
