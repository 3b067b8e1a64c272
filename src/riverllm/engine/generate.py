"""The token loop: prefill, then one token at a time, with sampling, EOS, stop checks and timing.

`decode` is a generator of `StepEvent`s (one per generated token, for every row of the batch) so
that streaming, batch generation and benchmarks all share one loop. The per-token timing of a
step includes the device sync that reading the sampled token forces anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from riverllm.engine.core import RiverEngine
from riverllm.policy import ExitPolicy


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def warpers(self) -> LogitsProcessorList:
        # transformers' own warpers, so sampling means exactly what it means in `generate`.
        warpers = LogitsProcessorList([TemperatureLogitsWarper(self.temperature)])
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


@dataclass
class StepEvent:
    step: int  # 0: the token produced by the prompt (prefill)
    tokens: list[int]  # one per row (pad_token_id for a row that had finished)
    exit_layers: list[int]  # one per row: backbone layers its token ran
    seconds: float
    finished: list[bool]  # rows done after this token (EOS or a stop check)
    # Lossless decoding emits a block of tokens per row and cycle, of different lengths per row:
    # present[r] False means row r has no token in this event; row_seconds[r] is row r's time per
    # token in this cycle. None: every unfinished row has a token, each taking `seconds`.
    present: list[bool] | None = None
    row_seconds: list[float] | None = None

    @property
    def exit_layer(self) -> int:
        return max(self.exit_layers)


class Sampler:
    """Picks one row's next token. Each row has its own settings and random generator, so that a
    row samples exactly what it samples alone, whatever shares its batch."""

    def __init__(self, sampling: SamplingConfig, device: torch.device):
        self.sampling = sampling
        self.warpers = None if sampling.greedy else sampling.warpers()
        self.generator = None
        if sampling.seed is not None and not sampling.greedy:
            self.generator = torch.Generator(device=device).manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [vocab] -> a 0-d token tensor (no host read here)."""
        if self.warpers is None:
            # float32 first: torch's CPU argmax over bfloat16 is 4x slower (0.55 vs 0.14 ms over
            # 151,936 logits, cast included), and the cast is exact, so is the index
            return logits.float().argmax(dim=-1)
        # The warpers used here (temperature, top-k, top-p) do not read the context ids.
        scores = self.warpers(None, logits.float()[None])
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator)[0, 0]


@torch.no_grad()
def decode(
    engine: RiverEngine,
    prompts: list[list[int]],
    policy: ExitPolicy,
    river: nn.ModuleList | None,
    max_new_tokens: int,
    sampling: SamplingConfig | list[SamplingConfig] = SamplingConfig(),
    eos_token_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
    stop_check: Callable[[int, list[int]], bool] | None = None,
    use_cuda_graphs: bool = False,
    lm_head: nn.Module | None = None,
) -> Iterator[StepEvent]:
    """Generate up to `max_new_tokens` for each prompt (token-id lists), as one batch.

    sampling: one config for every row, or one per row. stop_check(row, generated_ids) -> True
    ends that row (stop strings live above this loop). use_cuda_graphs: decode through
    `cuda_graphs.GraphRunner` (replayed CUDA graphs on a GPU; off CUDA the same static-buffer
    steps run eagerly, which is how CPU tests check them). lm_head: a low-bit LM head in place of
    the model's (`river.low_bit_head`).
    """
    device = engine.device
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    counts = [len(p) for p in prompts]
    prior = policy.kv_strategy != "river"
    if use_cuda_graphs and not prior:
        from riverllm.engine.cuda_graphs import graph_runner

        runner = graph_runner(engine, batch, longest + max_new_tokens)
        cache, forward, prefill = runner.cache, runner.forward, runner.prefill
    else:
        cache = engine.new_cache(batch, longest + max_new_tokens, track_filled=prior)
        forward, prefill = engine.forward, engine.prefill
    # Finished rows leave the batch, except where shapes are fixed (graphs) or the batch decides
    # together (prior strategies): there they ride along, decoding padding, without a say.
    ride_along = prior or use_cuda_graphs
    cache.prompt_lengths = list(counts)
    samplings = sampling if isinstance(sampling, list) else [sampling] * batch
    samplers = [Sampler(s, device) for s in samplings]
    eos = set(eos_token_ids)
    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch  # kept on the host: reading the sampled tokens is the step's one sync
    exit_layers = [0] * batch

    start = time.perf_counter()
    output = prefill(prompts, cache, policy, river, lm_head=lm_head)
    rows = list(range(batch))  # the rows the last step ran
    for step in range(max_new_tokens):
        sampled = torch.stack([samplers[row](output.logits[i]) for i, row in enumerate(rows)]).tolist()
        now = time.perf_counter()
        tokens = [pad_token_id] * batch
        for i, row in enumerate(rows):
            exit_layers[row] = output.exit_layers[i]
            if finished[row]:
                continue
            token = tokens[row] = sampled[i]
            generated[row].append(token)
            finished[row] = token in eos or (stop_check is not None and stop_check(row, generated[row]))
        yield StepEvent(step, tokens, list(exit_layers), now - start, list(finished))
        if all(finished) or step == max_new_tokens - 1:
            return
        start = time.perf_counter()
        if ride_along:
            next_ids = torch.tensor(tokens, device=device)[:, None]
            output = forward(next_ids, cache, policy, river, deciding=[not done for done in finished],
                             lm_head=lm_head)
        else:
            rows = [row for row in range(batch) if not finished[row]]
            next_ids = torch.tensor([tokens[row] for row in rows], device=device)[:, None]
            output = forward(next_ids, cache, policy, river, rows=None if len(rows) == batch else rows,
                             lm_head=lm_head)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    exit_layers: list[int]  # per generated token: backbone layers run for it (L: never left)
    token_times: list[float]  # seconds per generated token; the first one includes the prefill
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    prompt_tokens: int
    num_layers: int
    method: str = ""
    extra: dict = field(default_factory=dict)
    tau: float | None = None  # the exit threshold used (None: the method has none)
    tau_source: str = ""  # where it came from: "request" (given), "profile" (calibrated) or "default"
    compute: str = ""  # what it ran on, e.g. "float32, 1 CPU thread" (see RiverLM.compute)

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed: tokens after the first over their time (the first token pays the prefill)."""
        if len(self.token_times) > 1:
            return (len(self.token_times) - 1) / max(sum(self.token_times[1:]), 1e-12)
        return len(self.token_times) / max(sum(self.token_times), 1e-12)

    @property
    def prefill_s(self) -> float:
        return self.token_times[0] if self.token_times else 0.0

    @property
    def mean_exit_layer(self) -> float:
        return sum(self.exit_layers) / len(self.exit_layers) if self.exit_layers else float(self.num_layers)

    @property
    def full_precision_share(self) -> float:
        """Share of the model's layers that ran at full precision, over the generated tokens."""
        return self.mean_exit_layer / self.num_layers

    def summary(self) -> str:
        tau = "" if self.tau is None else f" (tau {self.tau:g} from the {self.tau_source})"
        drafting = self.extra.get("drafting")
        if drafting:  # lossless: every token is the backbone's; what matters is how drafts fared
            return (f"{len(self.token_ids)} tokens, {self.tokens_per_s:.1f} tok/s, {self.method}{tau}, exact: "
                    f"{100 * drafting['acceptance_rate']:.0f}% of drafts accepted, "
                    f"{drafting['tokens_per_verify']:.2f} tokens per backbone pass, drafts left at layer "
                    f"{drafting['mean_draft_exit_layer']:.1f}/{self.num_layers}" + (f", {self.compute}" if self.compute else ""))
        # a static mix (w4-last8) has no exits: its "exit layers" count the backbone layers it ran
        depth = ("backbone layers" if "-last" in self.method else "mean exit layer")
        return (f"{len(self.token_ids)} tokens, {self.tokens_per_s:.1f} tok/s, {self.method}{tau}, "
                f"{depth} {self.mean_exit_layer:.1f}/{self.num_layers}, "
                f"{100 * self.full_precision_share:.0f}% of layers at full precision"
                + (f", {self.compute}" if self.compute else ""))

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(tokens_per_s=self.tokens_per_s, prefill_s=self.prefill_s, mean_exit_layer=self.mean_exit_layer,
                    full_precision_share=self.full_precision_share)
        return data
