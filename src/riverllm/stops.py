"""Incremental stop-string matching for streamed text.

`StopMatcher.push(delta)` takes the text a generation step added and returns the text that is
safe to show now and whether a stop string was completed. It looks only at the new text plus a
tail of fewer characters than the longest stop string (the most a stop can reach back into text
already seen), so each step costs O(len(delta) + longest stop), not a rescan of the whole text.
The tail that could still grow into a stop string is held back until it cannot.

Meant for the token loop (api/engine) as well as the server's streams; it knows nothing of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StopMatcher:
    stops: list[str]
    _pending: str = ""  # received but not yet released: may be the start of a stop string
    stopped: bool = False
    _reach: int = field(init=False)

    def __post_init__(self) -> None:
        self.stops = [stop for stop in self.stops if stop]
        self._reach = max((len(stop) for stop in self.stops), default=1) - 1

    def push(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string ended the text). After a stop, the text
        before it is returned and every later push returns ("", True)."""
        if self.stopped:
            return "", True
        window = self._pending + delta
        first = min((at for at in (window.find(stop) for stop in self.stops) if at >= 0), default=-1)
        if first >= 0:
            self.stopped, self._pending = True, ""
            return window[:first], True
        held = self._held_back(window)
        self._pending = window[len(window) - held:] if held else ""
        return window[:len(window) - held], False

    def flush(self) -> str:
        """The held-back tail, once no more text will come (it was not a stop after all)."""
        rest, self._pending = ("" if self.stopped else self._pending), ""
        return rest

    def _held_back(self, window: str) -> int:
        """Length of the longest tail of `window` that is a proper prefix of some stop string."""
        for length in range(min(self._reach, len(window)), 0, -1):
            tail = window[-length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0
