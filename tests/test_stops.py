"""Incremental stop matching (riverllm.stops): what is safe to emit, when a stop hits, and that
each step looks at a bounded window, not the whole text."""

from __future__ import annotations

import random

from riverllm.stops import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool, str]:
    matcher = StopMatcher(stops)
    out, hit = [], False
    for piece in pieces:
        text, hit = matcher.push(piece)
        out.append(text)
    return out, hit, matcher.flush()


def test_a_stop_prefix_is_held_back_until_it_cannot_be_a_stop():
    # lm.stream's pieces for " 5, 6, 7" with stop ", 7": the last "," may start the stop string.
    assert run([", 7", "END"], [" 5", ",", " 6", ","]) == ([" 5", "", ", 6", ""], False, ",")
    assert run([", 7"], [" 5", ",", " 6", ",", " 7", " more"]) == ([" 5", "", ", 6", "", "", ""], True, "")
    assert run([], ["a", "b"]) == (["a", "b"], False, "")


def test_a_stop_across_many_pieces_and_the_earliest_of_several():
    assert run(["\n\n", "###"], ["a#", "#", "b\n", "\nc"]) == (["a", "", "##b", ""], True, "")
    out, hit, _ = run(["xyz", "yz"], ["wxy", "z"])
    assert "".join(out) == "w" and hit  # the stop that starts first wins ("xyz" at 1, not "yz" at 2)

def reference(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    """What a token loop does: after each piece, look for the stops in the whole text so far;
    at the first piece after which one is there, cut at the earliest one."""
    text = ""
    for piece in pieces:
        text += piece
        starts = [at for at in (text.find(stop) for stop in stops) if at >= 0]
        if starts:
            return text[:min(starts)], True
    return text, False


def test_equals_rescanning_the_whole_text_after_every_piece():
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice("ab\n") for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice("ab\n") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        out, hit, rest = run(stops, pieces)
        assert ("".join(out) + rest, hit) == reference(stops, pieces), (text, stops, pieces)


def test_each_step_keeps_a_bounded_window():
    matcher = StopMatcher(["<stop>"])
    for _ in range(10000):
        matcher.push("<sto")  # always a possible prefix
        matcher.push("x")
        assert len(matcher._pending) < len("<stop>")
