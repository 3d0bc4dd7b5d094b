"""grpo-math's answer grader, loaded from the environment's own grader.py: equivalent,
symbolically equal and different answers, final-answer extraction, and the R1-zero reward."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.paths import ENVIRONMENTS

GRPO_MATH = ENVIRONMENTS / "grpo-math"


def _grader():
    spec = importlib.util.spec_from_file_location("grpo_math_grader", GRPO_MATH / "grader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EQUIVALENT = [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("0.5", "\\frac{1}{2}"),
    ("1/2", "\\frac12"),
    (".5", "0.5"),
    ("\\frac{3}{4}", "0.75"),
    ("10\\%", "10"),
    ("\\$18.90", "18.90"),
    ("5 \\text{ cm}", "5"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("x = 3", "3"),
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("(1, 2.0)", "(1,2)"),
    ("Tuesday", "\\text{Tuesday}"),
    ("\\text{(A)}", "(A)"),
    ("2\\sqrt{3}", "2\\sqrt3"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
    ("-\\frac{1}{3}", "\\frac{-1}{3}"),
    ("0.33333", "\\frac{1}{3}"),
    ("3.0", "3"),
    ("12 \\text{ dollars}", "12"),
    ("x \\in [2, 5)", "[2,5)"),
    ("\\{1,2\\}", "\\{1, 2\\}"),
]
SYMBOLIC = [("\\sqrt{12}", "2\\sqrt{3}"), ("x^2+2x+1", "(x+1)^2"), ("\\pi/2", "\\frac{\\pi}{2}")]
NOT_EQUIVALENT = [
    ("\\frac{1}{3}", "\\frac{1}{2}"),
    ("0.33", "\\frac{1}{3}"),
    ("(1,2)", "(2,1)"),
    ("(1,2]", "(1,2)"),
    ("5", "-5"),
    ("x+1", "x-1"),
    (None, "5"),
    ("", "5"),
    ("12", "1,2"),
    ("2\\sqrt{3}", "3\\sqrt{2}"),
    ("10", "100"),
    ("\\frac{1}{0}", "1"),
    ("2m", "2"),
    ("__import__('os').system('touch /tmp/graded')", "0"),  # never evaluated
]


@pytest.mark.parametrize(("predicted", "reference"), EQUIVALENT)
def test_grader_accepts_equivalent_answers(predicted, reference):
    assert _grader().is_equivalent(predicted, reference)


@pytest.mark.parametrize(("predicted", "reference"), SYMBOLIC)
def test_grader_accepts_symbolically_equal_answers_with_sympy(predicted, reference):
    pytest.importorskip("sympy")
    assert _grader().is_equivalent(predicted, reference)


@pytest.mark.parametrize(("predicted", "reference"), NOT_EQUIVALENT)
def test_grader_rejects_different_answers(predicted, reference):
    assert not _grader().is_equivalent(predicted, reference)


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        ("<think> 2+2 </think> <answer> \\boxed{4} </answer>", "4", 1.0),
        ("<think> ... </think> <answer> 4 </answer>", "4", 1.0),
        ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac12", 1.0),  # no answer block: last box
        ("<answer>3</answer> on second thought <answer>4</answer>", "4", 1.0),  # the last block
        ("<answer>The answer is $\\boxed{x=7}$</answer>", "7", 1.0),
        ("\\boxed{4", "4", 0.0),  # cut off inside the box
        ("no final answer here", "4", 0.0),
        ("<answer>5</answer>", "4", 0.0),
    ],
)
def test_grader_extracts_the_final_answer(response, reference, expected):
    assert _grader().grade(response, reference) == expected


def test_r1_zero_reward_needs_format_and_answer():
    grader = _grader()
    assert grader.reward("<think> 2+2 </think> <answer> 4 </answer>", "4")["reward"] == 1.0
    wrong = grader.reward("<think> 2+2 </think> <answer> 5 </answer>", "4")
    assert (wrong["format_reward"], wrong["reward"]) == (1.0, 0.0)
    assert grader.reward("the answer is \\boxed{4}", "4")["reward"] == 0.0
    assert grader.last_boxed("\\fbox{7}") == "7" and grader.last_boxed("\\boxed 5$") == "5"
    assert not Path("/tmp/graded").exists()
