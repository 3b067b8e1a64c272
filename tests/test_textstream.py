"""Incremental detokenization with stop strings (textstream.py): what is streamed is always a
prefix of the final text, the final text equals a full decode cut at the first stop, and each
token is decoded once."""

from __future__ import annotations

import pytest

from riverllm.textstream import TextStream

TEXTS = [
    "Hello, world! The river flows: 1, 2, 3, 4, 5.\n\nDone.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # -> 5",
    "Ünïcödé tèxt, emoji 🌊🚣 and 中文字符 mixed with ASCII.",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf):
    return smollm2_hf[1]


def stream_all(tokenizer, ids, stops):
    stream = TextStream(tokenizer, stops)
    shown = []
    for token in ids:
        shown.append(stream.push(token))
        assert stream.text.startswith("".join(shown))  # never ahead of the text
        if stream.stopped:
            break
    shown.append(stream.finish())
    return stream, "".join(shown)


@pytest.mark.parametrize("text", TEXTS)
def test_without_stops_the_stream_is_the_full_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream, shown = stream_all(tokenizer, ids, [])
    assert shown == stream.text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stop", ["\n\n", "3", "river flows", "🚣", "a + b\n", "not in the text"])
def test_stops_cut_the_text_and_nothing_past_them_is_streamed(tokenizer, text, stop):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    stream, shown = stream_all(tokenizer, ids, [stop, "zzz-unused"])
    expected = full[: full.find(stop)] if stop in full else full
    assert shown == stream.text == expected
    assert stream.stopped == (stop in full)


def test_a_stop_string_spanning_tokens_is_held_back_until_decided(tokenizer):
    ids = tokenizer("one two three four", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, ["three four"])
    shown = "".join(stream.push(token) for token in ids) + stream.finish()
    assert shown == "one two " and stream.stopped
    # The beginning of a stop string that does not complete is released in the end.
    stream = TextStream(tokenizer, ["three five"])
    shown = "".join(stream.push(token) for token in ids) + stream.finish()
    assert shown == "one two three four" and not stream.stopped


def test_library_stream_never_shows_what_the_result_leaves_out(smollm2):
    prompt = "Count from 1 to 10, separated by commas."
    for stop in ["4", ", 5", "1, 2"]:
        events = list(smollm2.stream(prompt, method="dense", max_new_tokens=30, stop=[stop]))
        shown = "".join(e.text for e in events)
        assert shown == events[-1].result.text and stop not in shown
