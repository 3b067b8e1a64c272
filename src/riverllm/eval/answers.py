"""The final number of a chain-of-thought answer, and whether it is right.

Models write answers in many shapes: "The answer is $1,234.50.", "\\boxed{18}", "#### 18",
"= 18 apples", "-3", "3/4". We read the answer where the reply says it is, most explicit first:

1. the last `\\boxed{...}` (LaTeX, as math-tuned models write it);
2. the first number after the last "the answer is" / "final answer" / "answer:" / "####";
3. otherwise the last number in the reply (chain of thought ends with the result).

A number here is an optionally signed integer or decimal, with thousands commas in groups of
three ("1,234,567"), an optional "$" or trailing "%", or a fraction "a/b" or "\\frac{a}{b}".
A "-" counts as a sign only where it cannot be subtraction ("5-3" is 5 and 3, not 5 and -3).
"""

from __future__ import annotations

import math
import re

# One number: [-][$]digits with comma groups or plain digits, optional decimals, or a bare ".5".
_NUMBER = r"""
    (?<![\w./])                       # not glued to a word, a decimal point or a fraction bar
    (?P<sign>[-\u2212])?\$?           # a sign only right before the digits: "10 - 5" is subtraction
    (?P<int>\d{1,3}(?:,\d{3})+|\d+)?
    (?P<frac>\.\d+)?
    (?:\s?/\s?(?P<den>\d+(?:\.\d+)?))?  # a fraction a/b
    (?![\d])
"""
_NUMBER_RE = re.compile(_NUMBER, re.VERBOSE)
_BOXED_RE = re.compile(r"\\boxed\s*\{")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_ANSWER_MARKERS = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)|####", re.IGNORECASE)


def _numbers(text: str) -> list[float]:
    """Every number in `text`, left to right."""
    text = _FRAC_RE.sub(lambda m: f"{m[1]}/{m[2]}", text)
    found = []
    for match in _NUMBER_RE.finditer(text):
        if match["int"] is None and match["frac"] is None:
            continue  # a lone sign or "$"
        value = float((match["int"] or "0").replace(",", "") + (match["frac"] or ""))
        if match["den"] is not None:
            denominator = float(match["den"])
            if denominator == 0:
                continue
            value /= denominator
        if match["sign"]:
            value = -value
        found.append(value)
    return found


def _boxed_contents(text: str) -> str | None:
    """Contents of the last \\boxed{...}, braces balanced (\\boxed{\\frac{1}{2}} holds braces)."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    return text[start:]  # unclosed (the reply ran out of tokens): take what is there


def extract_answer(text: str) -> float | None:
    """The reply's final numeric answer, or None when it states none."""
    boxed = _boxed_contents(text)
    if boxed is not None:
        numbers = _numbers(boxed)
        if numbers:
            return numbers[0]
    markers = list(_ANSWER_MARKERS.finditer(text))
    if markers:
        numbers = _numbers(text[markers[-1].end():])
        if numbers:
            return numbers[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def parse_reference(answer: str) -> float | None:
    """A dataset's reference answer ("18", "9 apples", "83.2 dollars", "1,200") as a number; None
    when it does not start with one ("3:30 p.m.", "Yes", "3:2")."""
    match = re.match(r"^\s*(-?\d[\d,]*(?:\.\d+)?)(?:\s+\S.*)?$", answer)
    if not match:
        return None
    return float(match[1].replace(",", ""))


def answers_match(predicted: float | None, reference: float) -> bool:
    """Equal up to float noise (0.1 + 0.2 == 0.3 here); a reply with no number is wrong."""
    return predicted is not None and math.isclose(predicted, reference, rel_tol=1e-6, abs_tol=1e-6)
