"""Lossless River: the river drafts, the backbone verifies (speculative decoding with no second model).

River's own path (backbone blocks up to the exit, twins after, one shared KV cache) is a cheap
draft model that needs no training and no cache of its own. A cycle, per row:

1. Draft: from the last accepted token (not yet in the cache), decode up to `max_drafts` tokens
   with River, per-token exits as usual. Drafting stops early at an EOS token, at the row's token
   budget, or when the draft is unsure (its top-1 probability below `min_confidence`).
   With `lookup_tokens` set, a row whose last few tokens occurred earlier in its prompt or output
   drafts the tokens that followed them there instead (prompt-lookup decoding, Saxena 2023; no
   layer runs for such a draft); River drafts the cycles where the context has no match.
2. Verify: rewind the row to where the cycle started and run the full-precision backbone over the
   accepted token plus the drafts, at their slots, in one forward pass. It overwrites those slots'
   K/V at every layer with the backbone's, so the cache is exactly dense decoding's.
3. Accept the longest prefix of drafts the backbone agrees with, then take the backbone's own
   token (the correction at the first disagreement, or a bonus token when all agree), and rewind
   the row to just after the accepted tokens.

Greedy decoding emits exactly dense greedy decoding's tokens. This needs more than "the same
math": a verified token must get the same bits as when dense decodes it alone, or a near tie can
flip. So the verify pass lists the row once per token (`RiverEngine.context`: a row listed m times
feeds m consecutive slots), and every token runs through the kernels one decoding step uses: row-
stable linear layers, and an attention call over exactly its own visible slots (docs/engine.md).
Sampling uses the speculative-sampling acceptance rule (Leviathan et al. 2023; Chen et al. 2023):
accept draft d with probability min(1, p(d)/q(d)), on rejection sample from max(p - q, 0), so the
output distribution is dense's (p: dense, q: the draft, both after the same warpers).

What verification could reuse: a draft token's K/V and hidden states are the backbone's own up to
its exit layer only while every earlier token of the block also stayed that deep; `DraftStats`
records the bound (`reusable_layers`) instead of exploiting it (docs/lossless.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from riverllm.engine.cache import KVCache
from riverllm.engine.core import RiverEngine
from riverllm.engine.generate import Sampler, SamplingConfig, StepEvent
from riverllm.policy import ExitPolicy

BACKBONE = ExitPolicy()  # the verifier: every layer, full precision
LOOKUP_MAX_NGRAM = 4  # prompt lookup tries the context's last 4 tokens first, then 3, ... down to the minimum


def lookup_drafts(context: list[int], count: int, min_ngram: int = 2) -> list[int]:
    """Prompt-lookup drafts: up to `count` tokens that followed the latest earlier occurrence of the
    context's last n tokens, for the longest n from LOOKUP_MAX_NGRAM down to min_ngram that occurs;
    [] when none does. Vectorized: a cycle of a long context on a GPU must not wait on a Python scan."""
    tokens = torch.tensor(context)
    for n in range(min(LOOKUP_MAX_NGRAM, len(context) - 1), min_ngram - 1, -1):
        earlier = tokens[:-1].unfold(0, n, 1)  # every n-gram with a token after it (the tail itself excluded)
        hits = (earlier == tokens[-n:]).all(dim=1).nonzero()
        if len(hits):
            start = int(hits[-1]) + n  # the latest: the nearest context is the likeliest to repeat
            return context[start:start + count]
    return []


@dataclass(frozen=True)
class DraftConfig:
    max_drafts: int = 4  # drafts per cycle at most (k)
    # Stop drafting once the draft's top-1 probability falls below this: a draft that unsure is
    # likely rejected, and every rejected draft costs a River step plus a verify row.
    min_confidence: float = 0.0
    # Prompt lookup: draft up to this many tokens copied from the context where its last tokens
    # occurred before (0: off). Code and quoting answers repeat their prompt; a copied draft costs
    # no layer at all, only its row in the verify pass.
    lookup_tokens: int = 0
    # The shortest tail that counts as a match: single tokens recur everywhere and their
    # continuations are mostly wrong, so a lone-token match would replace a better River draft.
    lookup_min_ngram: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.max_drafts <= 64:
            raise ValueError(f"max_drafts must be in 1..64, got {self.max_drafts}")
        if not 0.0 <= self.min_confidence < 1.0:
            raise ValueError(f"min_confidence must be in [0, 1), got {self.min_confidence}")
        if not 0 <= self.lookup_tokens <= 64:
            raise ValueError(f"lookup_tokens must be in 0..64, got {self.lookup_tokens}")
        if not 1 <= self.lookup_min_ngram <= LOOKUP_MAX_NGRAM:
            raise ValueError(f"lookup_min_ngram must be in 1..{LOOKUP_MAX_NGRAM}, got {self.lookup_min_ngram}")


@dataclass
class DraftStats:
    """One row's drafting record."""

    verifies: int = 0  # cycles (one backbone pass each)
    drafted: int = 0
    accepted: int = 0
    looked_up: int = 0  # of the drafted tokens, those copied by prompt lookup
    looked_up_accepted: int = 0
    draft_exit_layers: list[int] = field(default_factory=list)
    reusable_layers: int = 0  # see the module docstring: backbone layers a verify could have skipped

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verify(self) -> float:
        """Tokens emitted per backbone pass: the accepted drafts plus the backbone's own token."""
        return (self.accepted + self.verifies) / self.verifies if self.verifies else 0.0

    @property
    def drafts_per_verify(self) -> float:
        return self.drafted / self.verifies if self.verifies else 0.0

    @property
    def mean_draft_exit_layer(self) -> float:
        return sum(self.draft_exit_layers) / len(self.draft_exit_layers) if self.draft_exit_layers else 0.0

    def to_dict(self) -> dict:
        return {"verifies": self.verifies, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "tokens_per_verify": self.tokens_per_verify,
                "drafts_per_verify": self.drafts_per_verify, "mean_draft_exit_layer": self.mean_draft_exit_layer,
                "reusable_layers": self.reusable_layers, "looked_up": self.looked_up,
                "looked_up_accepted": self.looked_up_accepted}


class Judge(Sampler):
    """One row's token choices: the first token (as `Sampler`), the draft's pick, and the acceptance
    rule, greedy or sampled, all from the row's own generator."""

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution a token is drawn from: softmax of the warped logits [.., vocab]."""
        return torch.softmax(self.warpers(None, logits.float().reshape(-1, logits.shape[-1])), dim=-1)

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def draft(self, logits: torch.Tensor, need_confidence: bool) -> tuple[int, float, torch.Tensor | None]:
        """(token, its probability under the draft, the draft distribution or None when greedy)."""
        if self.warpers is None:
            if not need_confidence:
                return int(logits.float().argmax()), 1.0, None  # float: see Sampler
            top = torch.softmax(logits.float(), dim=-1).max(dim=-1)
            return int(top.indices), float(top.values), None
        q = self.probs(logits)[0]
        token = self.draw(q)
        return token, float(q[token]), q

    def accept(self, logits: torch.Tensor, drafts: list[int], draft_probs: list[torch.Tensor | None]) -> list[int]:
        """Backbone logits [m+1, vocab] at the accepted token and each draft -> the tokens to emit:
        the accepted drafts, then the backbone's correction or bonus token. When sampling, a draft
        whose law is None was copied (prompt lookup): its law is all mass on the token."""
        if self.warpers is None:
            targets = logits.float().argmax(dim=-1).tolist()  # one host read for the whole block
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
                accepted += 1
            return drafts[:accepted] + [targets[accepted]]
        p = self.probs(logits)
        for i, (token, q) in enumerate(zip(drafts, draft_probs)):
            if q is None:
                q = torch.zeros_like(p[i])
                q[token] = 1.0
            ratio = float(p[i, token]) / max(float(q[token]), 1e-30)
            if ratio >= 1.0 or float(torch.rand((), generator=self.generator)) < ratio:
                continue
            residual = (p[i] - q).clamp_min(0.0)
            total = float(residual.sum())
            # p == q up to rounding leaves no residual mass: then p itself is the right law.
            return drafts[:i] + [self.draw(residual / total if total > 0 else p[i])]
        return drafts + [self.draw(p[len(drafts)])]


class LosslessDecoder:
    """The draft-verify cycles of a batch of prompts, each in its own cache row.

    `start()` prefills and returns the first tokens' events; each `cycle()` drafts, verifies and
    returns the events of the tokens it accepted (one `StepEvent` per token position; a row whose
    block is shorter has `present` False there). `decode_lossless` drives it as `generate.decode`
    does; the server calls `cycle()` once per scheduling step."""

    def __init__(self, engine: RiverEngine, prompts: list[list[int]], draft_policy: ExitPolicy, river: nn.ModuleList,
                 max_new_tokens: int, sampling: SamplingConfig | list[SamplingConfig] = SamplingConfig(),
                 eos_token_ids: tuple[int, ...] = (), pad_token_id: int = 0,
                 stop_check: Callable[[int, list[int]], bool] | None = None, drafting: DraftConfig = DraftConfig(),
                 draft_head: nn.Module | None = None, stats: list[DraftStats] | None = None,
                 cache: KVCache | None = None, cache_rows: list[int] | None = None):
        self.engine, self.prompts, self.draft_policy, self.river = engine, prompts, draft_policy, river
        self.max_new_tokens, self.drafting, self.draft_head = max_new_tokens, drafting, draft_head
        self.eos, self.pad_token_id, self.stop_check = set(eos_token_ids), pad_token_id, stop_check
        batch = len(prompts)
        self.cache = cache or engine.new_cache(batch, max(len(p) for p in prompts) + max_new_tokens)
        self.cache_rows = cache_rows or list(range(batch))  # batch position -> cache row
        samplings = sampling if isinstance(sampling, list) else [sampling] * batch
        self.judges = [Judge(s, engine.device) for s in samplings]
        self.stats = stats if stats is not None else [DraftStats() for _ in range(batch)]
        self.generated: list[list[int]] = [[] for _ in range(batch)]
        self.finished = [False] * batch
        self.pending: list[int] = []  # per row: the last accepted token, not yet in the cache
        self.step = 0

    @property
    def done(self) -> bool:
        return all(self.finished)

    def start(self) -> list[StepEvent]:
        start = time.perf_counter()
        output = self.engine.prefill(self.prompts, self.cache, BACKBONE, rows=self.cache_rows)  # backbone K/V
        self.pending = [int(judge(output.logits[i])) for i, judge in enumerate(self.judges)]
        return self._emit({i: [token] for i, token in enumerate(self.pending)},
                          {i: [self.engine.num_layers] for i in range(len(self.prompts))}, time.perf_counter() - start)

    def cycle(self) -> list[StepEvent]:
        engine, cache = self.engine, self.cache
        start = time.perf_counter()
        rows = [i for i in range(len(self.prompts)) if not self.finished[i]]
        cache_row = {i: self.cache_rows[i] for i in rows}
        base = {i: cache.lengths[cache_row[i]] for i in rows}
        # A cycle emits the drafts it accepts plus one backbone token: leave room for that one.
        left = {i: self.max_new_tokens - len(self.generated[i]) - 1 for i in rows}
        drafts: dict[int, list[int]] = {i: self._look_up(i, left[i]) if left[i] > 0 else [] for i in rows}
        # A copied draft has no law of its own (None: one-hot) and ran no layer (exit layer 0).
        draft_probs: dict[int, list[torch.Tensor | None]] = {i: [None] * len(drafts[i]) for i in rows}
        draft_exits: dict[int, list[int]] = {i: [0] * len(drafts[i]) for i in rows}
        copied = {i for i in rows if drafts[i]}
        room = {i: min(self.drafting.max_drafts, left[i]) for i in rows}
        active = [i for i in rows if room[i] > 0 and i not in copied]
        last = {i: self.pending[i] for i in rows}
        need_confidence = self.drafting.min_confidence > 0
        while active:
            ids = torch.tensor([[last[i]] for i in active], device=engine.device)
            out = engine.forward(ids, cache, self.draft_policy, self.river, rows=[cache_row[i] for i in active],
                                 lm_head=self.draft_head)
            still = []
            for position, i in enumerate(active):
                token, confidence, q = self.judges[i].draft(out.logits[position], need_confidence)
                drafts[i].append(token)
                draft_probs[i].append(q)
                draft_exits[i].append(out.exit_layers[position])
                last[i] = token
                if (len(drafts[i]) < room[i] and token not in self.eos
                        and confidence >= self.drafting.min_confidence):
                    still.append(i)
            active = still
        for i in rows:  # rewind: the verify pass rewrites these slots with the backbone's K/V
            cache.lengths[cache_row[i]] = base[i]
        listing = [cache_row[i] for i in rows for _ in range(len(drafts[i]) + 1)]
        ids = torch.tensor([[token] for i in rows for token in [self.pending[i]] + drafts[i]], device=engine.device)
        verified = engine.forward(ids, cache, BACKBONE, None, rows=listing).logits
        blocks, exits = {}, {}
        offset = 0
        for i in rows:
            m = len(drafts[i])
            block = self.judges[i].accept(verified[offset:offset + m + 1], drafts[i], draft_probs[i])
            offset += m + 1
            accepted = len(block) - 1
            cache.lengths[cache_row[i]] = base[i] + 1 + accepted  # the pending token and the accepted drafts
            self.pending[i] = block[-1]
            blocks[i] = block
            exits[i] = draft_exits[i][:accepted] + [engine.num_layers]
            record = self.stats[i]
            record.verifies += 1
            record.drafted += m
            record.accepted += accepted
            if i in copied:
                record.looked_up += m
                record.looked_up_accepted += accepted
            else:
                record.draft_exit_layers.extend(draft_exits[i])
                record.reusable_layers += sum(_prefix_minimum(draft_exits[i]))
        return self._emit(blocks, exits, time.perf_counter() - start)

    def _look_up(self, i: int, room: int) -> list[int]:
        """Row i's drafts by prompt lookup; [] when off or the context has no match."""
        if not self.drafting.lookup_tokens:
            return []
        return lookup_drafts(self.prompts[i] + self.generated[i], min(self.drafting.lookup_tokens, room),
                             self.drafting.lookup_min_ngram)

    def _emit(self, blocks: dict[int, list[int]], exits: dict[int, list[int]], seconds: float) -> list[StepEvent]:
        """One event per token position of a cycle; a row's tokens after its end are dropped."""
        batch = len(self.prompts)
        longest = max(len(tokens) for tokens in blocks.values())
        row_seconds = [seconds / len(blocks[i]) if i in blocks else 0.0 for i in range(batch)]
        events = []
        for position in range(longest):
            tokens: list[int | None] = [None] * batch
            layers = [self.engine.num_layers] * batch
            for i, block in blocks.items():
                if self.finished[i] or position >= len(block):
                    continue
                token = tokens[i] = block[position]
                layers[i] = exits[i][position]
                self.generated[i].append(token)
                stopped = self.stop_check is not None and self.stop_check(i, self.generated[i])  # sees every token
                self.finished[i] = stopped or token in self.eos or len(self.generated[i]) >= self.max_new_tokens
            if any(t is not None for t in tokens):
                events.append(StepEvent(self.step + position, [self.pad_token_id if t is None else t for t in tokens],
                                        layers, seconds / longest, list(self.finished),
                                        present=[t is not None for t in tokens], row_seconds=row_seconds))
        self.step += longest
        return events


@torch.no_grad()
def decode_lossless(engine: RiverEngine, prompts: list[list[int]], draft_policy: ExitPolicy, river: nn.ModuleList,
                    max_new_tokens: int, sampling: SamplingConfig | list[SamplingConfig] = SamplingConfig(),
                    eos_token_ids: tuple[int, ...] = (), pad_token_id: int = 0,
                    stop_check: Callable[[int, list[int]], bool] | None = None,
                    drafting: DraftConfig = DraftConfig(), draft_head: nn.Module | None = None,
                    stats: list[DraftStats] | None = None, cache: KVCache | None = None) -> Iterator[StepEvent]:
    """`generate.decode`'s contract, with River drafting and the backbone verifying (see
    `LosslessDecoder`). draft_head: the LM head the drafts read (a low-bit copy; None: the
    model's). `stats` (one per prompt, filled in place) records each row's drafting. cache: where
    to decode (tests read it afterwards; default: a new one of the right size)."""
    decoder = LosslessDecoder(engine, prompts, draft_policy, river, max_new_tokens, sampling, eos_token_ids,
                              pad_token_id, stop_check, drafting, draft_head, stats, cache)
    yield from decoder.start()
    while not decoder.done:
        yield from decoder.cycle()


def _prefix_minimum(values: list[int]) -> list[int]:
    """Running minimum: draft i's backbone layers are exact only up to the shallowest exit so far."""
    out, low = [], None
    for value in values:
        low = value if low is None else min(low, value)
        out.append(low)
    return out
