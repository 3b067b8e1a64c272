"""Scoring of `riverllm eval`: numeric answers and HumanEval programs (the sandbox: test_sandbox.py).

No model is loaded here: HumanEval is scored on its own canonical solutions (which must pass) and
on wrong or hostile completions (which must fail without harming anything)."""

from __future__ import annotations

import math

import pytest

from riverllm.eval.answers import answers_match, extract_answer, parse_reference
from riverllm.eval.metrics import MetricContext, match_rates
from riverllm.eval.sandbox import check_function
from riverllm.eval.tasks import (
    GSM8K,
    ASDiv,
    HumanEval,
    Perplexity,
    Sample,
    _detokenize_brown,
    extract_code,
    humaneval_program,
    humaneval_tests,
)

# --- numeric answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("The answer is 18.", 18),
    ("She pays $1,234.50 in total. The answer is $1,234.50.", 1234.5),
    ("So the total is 1,000,000 dollars", 1_000_000),
    ("We get \\boxed{42} in the end, not 7", 42),
    ("Thus $\\boxed{\\frac{3}{4}}$", 0.75),
    ("\\boxed{1,234}", 1234),
    ("\\boxed{18 \\text{ apples}}", 18),
    ("#### 72", 72),
    ("**Answer:** 15 eggs", 15),
    ("The final answer is: -7", -7),
    ("The temperature fell to -12 degrees, so the answer is -12.", -12),
    ("It dropped by 5 degrees: 20 - 5 = 15", 15),
    ("5-3 = 2", 2),
    ("The answer is 18 vacuum cleaners (6 + 12 from the two houses).", 18),
    ("Each costs 2.5 dollars, 3 of them cost 7.50 dollars.", 7.5),
    ("He ran 3 miles on Monday, 4 on Tuesday and 5 on Wednesday, 12 miles in all", 12),
    ("It costs $.50 per apple", 0.5),
    ("The answer is 3/4 of the cake.", 0.75),
    ("The answer is 40. Check: 7 + 21 + 12 = 40, and 2 cats.", 40),
    ("Half of 10 is 5. The answer is 5.\n\nThe answer is 6.", 6),
    ("Profit rose 12.5% this year", 12.5),
    ("It is \u22125 outside", -5),
    ("x2 = 9", 9),
])
def test_extract_answer_on_tricky_outputs(text, expected):
    assert extract_answer(text) == pytest.approx(expected)


def test_extract_answer_finds_nothing_without_a_number():
    assert extract_answer("I cannot solve this problem.") is None
    assert extract_answer("The answer is unknown") is None


@pytest.mark.parametrize("answer, expected", [
    ("9 apples", 9), ("83.2 dollars", 83.2), ("18", 18), ("1,200 people", 1200), ("-3 degrees", -3),
    ("3:30 p.m.", None), ("Yes", None), ("3:2", None), ("1st", None), ("25/3", None),
])
def test_parse_reference(answer, expected):
    assert parse_reference(answer) == expected


def test_answers_match_tolerates_float_noise_only():
    assert answers_match(0.1 + 0.2, 0.3)
    assert answers_match(18.0, 18)
    assert not answers_match(18.01, 18)
    assert not answers_match(None, 18)


def test_math_scoring_uses_the_reference():
    sample = Sample("x", "2+2?", {"answer": 4.0})
    assert GSM8K().score(sample, "2 + 2 = 4. The answer is 4.", chat=True)[0] == 1.0
    score, details = GSM8K().score(sample, "The answer is 5.", chat=True)
    assert score == 0.0 and details == {"expected": 4.0, "predicted": 5.0}


def test_math_datasets_load_with_numeric_answers():
    gsm8k = GSM8K().samples(None, 0, progress=False)
    assert len(gsm8k) == 100 and all(isinstance(s.data["answer"], float) for s in gsm8k)
    asdiv = ASDiv().samples(None, 0, progress=False)
    assert len(asdiv) == 2159  # the 2305 problems less names, times and ratios
    first = ASDiv().samples(5, 0, progress=False)
    more = ASDiv().samples(20, 0, progress=False)
    assert [s.id for s in more[:5]] == [s.id for s in first]  # a larger limit extends a smaller one
    assert [s.id for s in ASDiv().samples(5, 1, progress=False)] != [s.id for s in first]


# --- HumanEval programs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems():
    return {sample.id: sample for sample in HumanEval().samples(None, 0, progress=False)}


def test_humaneval_has_164_problems(problems):
    assert len(problems) == 164


def test_extract_code_from_chat_replies():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    # The budget ran out before the closing fence.
    assert extract_code("```python\ndef f():\n    return") == "def f():\n    return"
    # An example block before the real one: take the one that defines something.
    assert extract_code("Use it as\n```\nf(1)\n```\nCode:\n```py\ndef f(x):\n    return x\n```") == \
        "def f(x):\n    return x\n"
    assert extract_code("    return x + 1") == "    return x + 1"


def _check(problem: dict, completion: str, chat: bool):
    return check_function(humaneval_program(problem, completion, chat), problem["entry_point"],
                          humaneval_tests(problem))


# Every 8th problem: enough variety (imports, helper functions, long tests) to run quickly; plus
# 32 (its tests use the prompt's helper `poly`) and 33 (its tests call the function by name).
CANONICAL_IDS = [f"HumanEval/{i}" for i in [*range(0, 164, 8), 33]]


@pytest.mark.parametrize("task_id", CANONICAL_IDS)
def test_canonical_solutions_pass_in_every_reply_shape(problems, task_id):
    problem = problems[task_id].data
    body = problem["canonical_solution"]
    whole = problem["prompt"] + body
    shapes = {
        "base model continuation": (body, False),
        "chat, whole function": (f"Sure!\n```python\n{whole}```\nIt loops over the list.", True),
        "chat, body only": (f"```python\n{body}```", True),
    }
    for shape, (completion, chat) in shapes.items():
        result = _check(problem, completion, chat)
        assert result.passed, f"{task_id} ({shape}): {result.detail}"


def test_wrong_solutions_fail(problems):
    problem = problems["HumanEval/0"].data
    other = problems["HumanEval/2"].data["canonical_solution"]  # right code for another problem
    for completion, chat in [("    return False\n", False), (other, False), ("    return (\n", False),
                             ("I am not sure how to solve this.", True),
                             ("```python\ndef has_close_elements(numbers, threshold):\n    return True\n```", True)]:
        result = _check(problem, completion, chat)
        assert not result.passed and result.status == "failed", completion


def test_a_program_that_exits_early_does_not_pass(problems):
    problem = problems["HumanEval/0"].data
    result = _check(problem, "    return False\nimport sys\nsys.exit(0)\n", False)
    assert not result.passed and "exited before its tests finished" in result.detail


# --- perplexity, match, Brown text --------------------------------------------------------------


def test_perplexity_aggregates_over_all_tokens():
    records = [{"nll": 2.0 * 10, "tokens": 10}, {"nll": 4.0 * 30, "tokens": 30}]
    assert Perplexity().aggregate(records) == pytest.approx(math.exp((20 + 120) / 40))


def test_match_compares_whole_outputs_with_dense(tmp_path):
    records = {
        ("gsm8k", "dense"): [{"id": "a", "token_ids": [1, 2]}, {"id": "b", "token_ids": [3]}],
        ("gsm8k", "river:0.9"): [{"id": "a", "token_ids": [1, 2]}, {"id": "b", "token_ids": [4]}],
        ("gsm8k", "w4"): [{"id": "a", "token_ids": [1]}],
        ("ppl", "dense"): [{"id": "brown/ca01", "nll": 1.0, "tokens": 1}],
        ("ppl", "w4"): [{"id": "brown/ca01", "nll": 1.0, "tokens": 1}],
    }
    context = MetricContext(records, {}, ["dense", "river:0.9", "w4"], {}, tmp_path)
    assert match_rates(context) == {("gsm8k", "dense"): 100.0, ("gsm8k", "river:0.9"): 50.0,
                                    ("gsm8k", "w4"): 0.0, ("ppl", "dense"): None, ("ppl", "w4"): None}


def test_brown_words_lose_their_tags():
    tagged = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ./.\n\n\tIt/pps ran/vbd ,/, fast/rb ./.\n"
    assert _detokenize_brown(tagged) == ['The jury said "no evidence".', "It ran, fast."]
