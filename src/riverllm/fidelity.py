"""Fidelity: how far a method's next-token predictions are from dense's, position by position.

Task accuracy on 100-164 problems cannot separate methods that are all close to dense (SPEC.md
section 2: a whole 4-bit copy of Qwen2.5-Coder-1.5B loses almost nothing at task level). These
measures can. Both are teacher-forced: the method reads exactly the tokens dense read (a text,
or a prompt followed by dense's own answer), token by token through `RiverLM.teacher_forced`, so
every position takes its own exit decision as in decoding, and its prediction of the next token
is compared with dense's at the same position:

* agree: the share of positions where the method's greedy next token is dense's greedy token;
* kl:    the mean KL(dense || method) of the two next-token distributions, in nats.

(`match`, the share of task samples whose whole greedy output equals dense's, needs no model and
lives with the eval's other metrics, in eval/metrics.py.)

Dense's side is computed once per text and kept as a `Reference`: the final hidden states its
logits come from, so that comparisons are exact over the whole vocabulary while a cached
reference stays small (see `Reference`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from riverllm.api import RiverLM
    from riverllm.policy import Method

@dataclass
class Segment:
    """A text to score: ids[:prompt_len] is prefilled, ids[prompt_len:] are predicted one by one."""

    key: str  # names the text (e.g. "brown/cr09@4096"), and its cached reference
    ids: list[int]
    prompt_len: int

    @property
    def positions(self) -> int:
        return len(self.ids) - self.prompt_len

    @property
    def fingerprint(self) -> str:
        """Pins the exact tokens: a cached result for a changed text is not reused."""
        return hashlib.sha1(repr((self.ids, self.prompt_len)).encode()).hexdigest()[:16]


@dataclass
class Reference:
    """Dense's next-token distributions at a segment's positions, kept as the final hidden states
    they come from (the input of the final norm, [positions, hidden], in the model's dtype).

    The logits are recomputed from them with the model's own head, so KL and agreement are exact
    over the whole vocabulary, while the reference takes hidden/vocab of the logits' space (2-6 KB
    per position instead of 0.2-0.6 MB): small enough to cache on disk for a whole eval run."""

    hidden: torch.Tensor

    @property
    def positions(self) -> int:
        return len(self.hidden)

    @torch.no_grad()
    def logits(self, lm: RiverLM) -> torch.Tensor:
        """[positions, vocab] float32, each row as the decoding step computed it, so that dense
        compares to itself exactly. On a CPU the positions go through the head as one batch of
        one-token rows, which the engine computes row-stably (each row's bits are those it gets
        alone); elsewhere a batched matmul may round differently, so each row goes alone."""
        engine = lm.engine
        hidden = self.hidden.to(engine.device)[:, None]
        if engine.device.type == "cpu":
            return engine.head(hidden)[:, 0].float()
        return torch.cat([engine.head(row)[:, 0].float() for row in hidden.split(1)])

    def save(self, path: Path) -> None:
        """Write atomically: a reference cut off half-way must never be read back."""
        from riverllm.files import write_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda temp: torch.save({"hidden": self.hidden}, temp))

    @classmethod
    def load(cls, path: Path) -> Reference:
        return cls(torch.load(path, map_location="cpu", weights_only=True)["hidden"])


@contextmanager
def final_hidden_states(lm: RiverLM) -> Iterator[list[torch.Tensor]]:
    """Collect what the model's final norm receives (the hidden states its head turns into logits)
    while the block runs: one [batch, tokens, hidden] tensor per engine step."""
    captured: list[torch.Tensor] = []
    handle = lm.engine.norm.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().cpu()))
    try:
        yield captured
    finally:
        handle.remove()


def stepwise_reference(lm: RiverLM, segment: Segment) -> Reference:
    """Dense teacher-forced token by token, exactly as every method is measured."""
    with final_hidden_states(lm) as captured:
        lm.teacher_forced(segment.ids, segment.prompt_len, "dense")
    hidden = torch.cat([h[0, -1:] for h in captured])
    if len(hidden) != segment.positions:  # the engine must call its head once per step
        raise RuntimeError(f"captured {len(hidden)} hidden states for {segment.positions} positions")
    return Reference(hidden)


def score_positions(reference_logits: torch.Tensor, logits: torch.Tensor, rows: int = 64
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: (agrees [n] bool, KL(dense || method) [n]), from dense's and a method's
    logits [n, vocab]; `rows` positions at a time, to bound memory on 150K-token vocabularies."""
    agrees, kls = [], []
    for start in range(0, len(logits), rows):
        dense = torch.log_softmax(reference_logits[start:start + rows].float(), dim=-1)
        method = torch.log_softmax(logits[start:start + rows].to(dense.device).float(), dim=-1)
        # Agreement: dense's greedy token is (one of) the method's most likely tokens. Comparing
        # values rather than argmax indices keeps exact ties from counting as disagreement.
        dense_choice = method.gather(1, dense.argmax(dim=-1, keepdim=True)).squeeze(1)
        agrees.append((dense_choice >= method.max(dim=-1).values).cpu())
        kls.append((dense.exp() * (dense - method)).sum(dim=-1).clamp(min=0).cpu())
    return torch.cat(agrees), torch.cat(kls)


@dataclass
class Fidelity:
    """Agreement and KL of one method against dense over some positions, with its exit depths."""

    positions: int = 0
    agreeing: int = 0
    kl_sum: float = 0.0
    exit_layers: list[int] = field(default_factory=list)
    num_layers: int = 0
    segments: list[tuple[int, int, float]] = field(default_factory=list)  # per text: positions, agreeing, kl_sum

    @property
    def agree(self) -> float:
        return self.agreeing / self.positions if self.positions else float("nan")

    @property
    def kl(self) -> float:
        return self.kl_sum / self.positions if self.positions else float("nan")

    @property
    def mean_exit_layer(self) -> float:
        return sum(self.exit_layers) / len(self.exit_layers) if self.exit_layers else float("nan")

    @property
    def full_precision_share(self) -> float:
        """Share of the model's layers run by the full-precision backbone, per position."""
        return self.mean_exit_layer / self.num_layers if self.num_layers else float("nan")

    def add(self, reference_logits: torch.Tensor, logits: torch.Tensor, exit_layers: Sequence[int]) -> None:
        """Score one text's positions."""
        agrees, kl = score_positions(reference_logits, logits)
        self.segments.append((len(agrees), int(agrees.sum()), float(kl.sum())))
        self.positions += len(agrees)
        self.agreeing += int(agrees.sum())
        self.kl_sum += float(kl.sum())
        self.exit_layers.extend(exit_layers)

    def standard_error(self, metric: str) -> float:
        """Standard error of `agree` or `kl` over the texts. Positions of one text are not
        independent (a hard passage is hard throughout), so the spread is taken between texts:
        the cluster-robust standard error of a ratio of sums. nan with fewer than two texts."""
        k = len(self.segments)
        if k < 2:
            return float("nan")
        mean = self.agree if metric == "agree" else self.kl
        index = 1 if metric == "agree" else 2
        spread = sum((segment[index] - mean * segment[0]) ** 2 for segment in self.segments)
        return (k / (k - 1) * spread) ** 0.5 / self.positions

    def to_dict(self) -> dict:
        return {"positions": self.positions, "texts": len(self.segments), "agree": self.agree,
                "agree_standard_error": self.standard_error("agree"), "kl": self.kl,
                "kl_standard_error": self.standard_error("kl"), "mean_exit_layer": self.mean_exit_layer,
                "full_precision_share": self.full_precision_share}


class References:
    """Dense's references, computed on first use with `teacher_forced(..., "dense")` and kept in
    memory, and on disk under `cache_dir` when one is given (one file per segment key)."""

    def __init__(self, lm: RiverLM, cache_dir: Path | None = None):
        self.lm, self.cache_dir = lm, cache_dir
        self._kept: dict[str, Reference] = {}

    def _path(self, segment: Segment) -> Path | None:
        if self.cache_dir is None:
            return None
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in segment.key)[:80]
        return self.cache_dir / f"{safe}-{segment.fingerprint}.pt"

    def put(self, segment: Segment, reference: Reference) -> None:
        self._kept[segment.key] = reference

    def get(self, segment: Segment) -> Reference:
        if segment.key in self._kept:
            return self._kept[segment.key]
        path = self._path(segment)
        reference = None
        if path is not None and path.exists():
            try:
                reference = Reference.load(path)
            except Exception:  # a damaged cache file is recomputed, never trusted
                reference = None
        if reference is None:
            reference = stepwise_reference(self.lm, segment)
            if path is not None:
                reference.save(path)
        self._kept[segment.key] = reference
        return reference


def measure(lm: RiverLM, segments: Iterable[Segment], method: str | Method, references: References,
            tau: float | None = None, bits: int | None = None, min_exit_layer: int = 1, progress: bool = False,
            description: str = "", give_up: Callable[[Fidelity], bool] | None = None,
            batch_size: int = 8, head_bits: int | None = None) -> Fidelity:
    """Agreement and KL of `method` against dense over every position of `segments`
    (or fewer: it stops after the first batch of segments at which `give_up(result so far)` is
    true). Segments are teacher-forced `batch_size` at a time, with per-row exits: each segment's
    logits and exits are those it gets alone. head_bits: read a low-bit copy of the LM head."""
    from tqdm.auto import tqdm

    segments = list(segments)
    result = Fidelity(num_layers=lm.num_layers)
    bar = tqdm(total=sum(s.positions for s in segments), desc=description or f"fidelity {method}",
               unit="tok", disable=not progress, leave=False)
    for start in range(0, len(segments), batch_size):
        chunk = segments[start:start + batch_size]
        scored = lm.teacher_forced_batch([s.ids for s in chunk], [s.prompt_len for s in chunk], method, tau=tau,
                                         bits=bits, min_exit_layer=min_exit_layer, head_bits=head_bits)
        for segment, (logits, exits) in zip(chunk, scored):
            result.add(references.get(segment).logits(lm), logits, exits)
            bar.update(segment.positions)
        if give_up is not None and give_up(result):
            break
    bar.close()
    return result
