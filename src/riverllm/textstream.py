"""Token ids in, text out, one token at a time: incremental detokenization with stop strings.

Decoding the whole generation again at every token costs O(n^2) over a generation; this keeps a
short window instead (the standard prefix/read-offset method of streaming servers): the text of
a new token is decode(ids[prefix:]) minus decode(ids[prefix:read]), where `prefix` trails a few
tokens behind so that tokenizers which merge bytes or spaces across tokens see their context. A
token that ends in an incomplete UTF-8 character yields nothing until the character completes.

Stop strings are searched only where a new match can begin (the last new characters plus the
longest stop's length), and text that could still turn out to be the start of a stop string is
held back: what `push` returns is always a prefix of the final text, so a streamed answer never
shows what the final answer leaves out.
"""

from __future__ import annotations

from collections.abc import Sequence

CONTEXT_TOKENS = 5  # tokens of left context decoded with each new one


class TextStream:
    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.text = ""  # all text decoded so far (up to the stop, once one is found)
        self.emitted = 0  # characters of `text` already returned
        self.stop_at: int | None = None  # where the first stop string begins in `text`
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add a token; return the new text that is safe to show now (maybe "")."""
        if self.stop_at is not None:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return self._release(final=False)  # an incomplete character: wait for the next token
        searched_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += after[len(before):]
        self._prefix, self._read = max(0, len(self.ids) - CONTEXT_TOKENS), len(self.ids)
        if self.stops:
            found = [i for i in (self.text.find(s, searched_from) for s in self.stops) if i >= 0]
            if found:
                self.stop_at = min(found)
                self.text = self.text[:self.stop_at]
                return self._release(final=True)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once generation is over (held-back characters included)."""
        if self.stop_at is None and self._read < len(self.ids):
            # Trailing bytes of an incomplete character: show them as decode does (U+FFFD).
            self.text += self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
            self._read = len(self.ids)
        return self._release(final=True)

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    def _release(self, final: bool) -> str:
        safe = len(self.text) if final else len(self.text) - self._held_back()
        if safe <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted:safe], safe
        return delta

    def _held_back(self) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        for size in range(min(self.longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0
