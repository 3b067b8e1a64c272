"""vLLM's Llama and Qwen2 models with River-LLM's early exit.

`RiverLlamaForCausalLM` / `RiverQwen2ForCausalLM` subclass vLLM's own classes: vLLM builds and
loads the model as usual; at the end of `load_weights` every decoder linear layer is replaced by
a `SplitLinear` holding the loaded layer and its HQQ twin, and hooks on every decoder layer
(`ExitRuleHooks`) measure s_l = cos(h_{l-1}, h_l) and move tokens to the river.

Exits are per sequence, inside vLLM's flattened batch. A decode token is its own sequence, so
decode exits are per token; a prompt (or prompt chunk) exits as one, at its least settled
token, as in riverllm's own engine. This is possible because the decoder layer's linear layers
can be split by token subset while its one attention call still covers the whole batch (the
attention metadata describes every token, so attention cannot run on a subset): tokens on the
river compute q/k/v with the twin, and the backbone layer's own `Attention` module writes their
K/V into vLLM's paged cache at that layer. Requests in one batch therefore never hold each other
back, and a request's exits do not depend on what else is batched with it. When the attention
metadata does not say where sequences start (a backend without `query_start_loc`), the whole
batch decides together at its minimum similarity, the paper's batch rule.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import CompilationMode, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from riverllm.errors import RiverError
from riverllm.files import write_text_atomic
from riverllm.policy import ExitPolicy
from riverllm.vllm_plugin.settings import RiverSettings, resolve_settings
from riverllm.vllm_plugin.twin import FusedTwin, RiverRows, SplitLinear, fingerprint, quantize_parts, twin_state

# Under the "vllm" logger namespace, so that vLLM's own log setup prints these lines.
logger = init_logger("vllm.riverllm")
STATS_ENV = "RIVERLLM_VLLM_STATS"  # a JSON file where exit statistics are written while serving


class ExitStats:
    """Counts of exit layers, for the mean exit layer the benchmarks and tests report."""

    def __init__(self, num_layers: int, settings: RiverSettings):
        self.num_layers, self.settings = num_layers, settings
        self.reset()
        self.written_at = 0.0
        self.path = os.environ.get(STATS_ENV)
        if self.path:
            atexit.register(self.write)

    def reset(self) -> None:
        self.decode_histogram = [0] * (self.num_layers + 1)  # index: backbone layers run
        self.prefill_sequences = 0
        self.prefill_exit_sum = 0
        self.steps = 0

    def add(self, group_exit: torch.Tensor, group_sizes: torch.Tensor) -> None:
        decode = group_exit[group_sizes == 1]
        prefill = group_exit[group_sizes > 1]
        for layer, count in zip(*torch.unique(decode, return_counts=True)):
            self.decode_histogram[int(layer)] += int(count)
        self.prefill_sequences += prefill.numel()
        self.prefill_exit_sum += int(prefill.sum())
        self.steps += 1
        # At most twice a second: a server's stats file is then at most one step stale once a
        # later step (any request) has run; a JSON dump per step would cost more than the exit rule.
        if self.path and time.monotonic() - self.written_at >= 0.5:
            self.write()

    def summary(self) -> dict:
        decode_tokens = sum(self.decode_histogram)
        mean = sum(i * n for i, n in enumerate(self.decode_histogram)) / decode_tokens if decode_tokens else None
        return {"tau": self.settings.tau, "tau_source": self.settings.tau_source, "bits": self.settings.bits,
                "group_size": self.settings.group_size, "num_layers": self.num_layers,
                "decode_tokens": decode_tokens, "decode_mean_exit_layer": mean,
                "decode_exit_histogram": self.decode_histogram, "prefill_sequences": self.prefill_sequences,
                "prefill_mean_exit_layer": self.prefill_exit_sum / self.prefill_sequences if self.prefill_sequences else None}

    def write(self) -> None:
        self.written_at = time.monotonic()
        write_text_atomic(self.path, json.dumps(self.summary(), indent=1) + "\n")


class RiverStep:
    """The exit state of one forward pass over vLLM's flattened batch."""

    def __init__(self, policy: ExitPolicy, num_layers: int, rows: RiverRows, stats: ExitStats):
        self.policy, self.num_layers, self.rows, self.stats = policy, num_layers, rows, stats
        self.deciding = False
        self.group_ids: torch.Tensor | None = None
        self.exit_layer: torch.Tensor | None = None
        self.counted = False

    def begin(self, num_tokens: int, device: torch.device) -> None:
        starts = _query_start_loc()
        tokens = torch.arange(num_tokens, device=device)
        if starts is None:
            # No sequence boundaries known (e.g. vLLM's profiling run): the batch decides as one.
            self.group_ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
        else:
            self.group_ids = torch.searchsorted(starts[1:].to(device).contiguous(), tokens, right=True)
        self.counted = starts is not None
        self.exit_layer = torch.full((num_tokens,), self.num_layers, dtype=torch.long, device=device)
        self.rows.set(torch.zeros(num_tokens, dtype=torch.bool, device=device))
        self.deciding = self.policy.needs_similarity and num_tokens > 0

    def after_layer(self, layer: int, similarity: torch.Tensor) -> None:
        """ExitPolicy.exits_after, for every sequence at once; `layer` is 1-based."""
        if layer <= self.policy.min_exit_layer or layer >= self.num_layers:
            return
        staying = ~self.rows.mask
        num_groups = int(self.group_ids.max()) + 1
        lowest = torch.full((num_groups,), float("inf"), device=similarity.device).scatter_reduce(
            0, self.group_ids, similarity.masked_fill(~staying, float("inf")), "amin")
        leaving = (lowest > self.policy.tau)[self.group_ids] & staying
        if bool(leaving.any()):
            self.exit_layer[leaving] = layer
            self.rows.set(self.rows.mask | leaving)
            self.deciding = self.rows.count < self.rows.mask.shape[0]

    def end(self) -> None:
        if self.counted and self.exit_layer is not None and self.exit_layer.numel():
            sizes = torch.bincount(self.group_ids)
            first = torch.full((sizes.numel(),), self.num_layers, dtype=torch.long, device=self.exit_layer.device)
            first = first.scatter_reduce(0, self.group_ids, self.exit_layer, "amin")
            present = sizes > 0
            self.stats.add(first[present].cpu(), sizes[present].cpu())
        self.rows.set(None)
        self.deciding = False


def _query_start_loc() -> torch.Tensor | None:
    """Where each sequence starts in the flattened batch, from the attention metadata."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # micro-batching: one dict per micro-batch
        metadata = metadata[0] if metadata else None
    if isinstance(metadata, dict):
        metadata = next(iter(metadata.values()), None)
    return getattr(metadata, "query_start_loc", None)


class ExitRuleHooks:
    """Applies the exit rule after each of vLLM's decoder layers, through torch's module hooks,
    so the layer stays where vLLM put it (its parameter names and its forward unchanged).

    vLLM's layers keep the residual stream split as (hidden, residual) and add them in the next
    norm, in place; h_l, the state the paper compares, is their sum, taken before the layer runs.
    """

    def __init__(self, layer: nn.Module, number: int, step: RiverStep):
        self.number, self.step = number, step
        self.before: torch.Tensor | None = None
        layer.register_forward_pre_hook(self.pre, with_kwargs=True)
        layer.register_forward_hook(self.post, with_kwargs=True)

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.step.deciding:
            hidden, residual = args[1], args[2]
            self.before = hidden if residual is None else hidden + residual

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        if self.before is None:
            return
        hidden, residual = output
        similarity = F.cosine_similarity(self.before.float(), (hidden + residual).float(), dim=-1)
        self.before = None
        self.step.after_layer(self.number, similarity)


class RiverMixin:
    """Everything River adds to a vLLM decoder-only model class (put it before the vLLM class)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        if vllm_config.compilation_config.mode != CompilationMode.NONE:
            # torch.compile / CUDA graphs would freeze one exit path; the exits are data-dependent.
            raise RiverError("River under vLLM runs eagerly: start vLLM with enforce_eager=True (--enforce-eager)")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if get_pp_group().world_size > 1:
            # The exit mask would have to travel with IntermediateTensors between stages.
            raise RiverError("River under vLLM supports tensor parallelism, not pipeline parallelism")
        if vllm_config.cache_config.enable_prefix_caching:
            logger.warning("River with prefix caching: a cached prompt prefix keeps the K/V of the path an earlier "
                           "request took, so a prompt's exits can depend on what ran before; "
                           "--no-enable-prefix-caching makes every answer its own (docs/vllm.md)")
        model_config = vllm_config.model_config
        self.river_settings = resolve_settings(model_config.hf_config, model_config.model)
        num_layers = model_config.hf_config.num_hidden_layers
        self.river_rows = RiverRows()
        self.river_stats = ExitStats(num_layers, self.river_settings)
        self.river_step = RiverStep(self.river_settings.policy(), num_layers, self.river_rows, self.river_stats)

    def load_weights(self, weights) -> set[str]:
        loaded = super().load_weights(weights)
        # Now, and not later: vLLM's process_weights_after_loading (which runs next) may replace
        # the weights by backend-specific handles (oneDNN prepacking on CPU).
        renamed = self._attach_river()
        # vLLM checks that every parameter was loaded; the split layers moved some, and the twins
        # (a Qwen2 q/k/v bias) are built from loaded ones.
        return {renamed.get(name, name) for name in loaded} | set(renamed.values()) | self._twin_parameter_names()

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs):
        num_tokens = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
        self.river_step.begin(num_tokens, positions.device)
        try:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        finally:
            self.river_step.end()

    # --- building the river ------------------------------------------------------------------

    def _river_targets(self) -> list[tuple[nn.Module, str, nn.Module, str]]:
        """(parent, attribute, linear, name) for every linear layer of every local decoder layer."""
        targets = []
        for index in range(self.model.start_layer, self.model.end_layer):
            layer = self.model.layers[index]
            for module_name, module in layer.named_modules():
                for child_name, child in module.named_children():
                    if isinstance(child, LinearBase):
                        targets.append((module, child_name, child, f"{index}.{module_name}.{child_name}"))
        return targets

    def _twin_parameter_names(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if ".twin." in name}

    @torch.no_grad()
    def _attach_river(self) -> dict[str, str]:
        """Build the twins and put the split layers in place; returns {old: new} parameter names."""
        settings = self.river_settings
        targets = self._river_targets()
        rank = get_tensor_model_parallel_rank()
        key = fingerprint([(name, linear.weight) for _, _, linear, name in targets], settings.bits,
                          settings.group_size, rank)
        path = _river_cache_dir() / f"vllm-{key}-b{settings.bits}-g{settings.group_size}.pt"
        saved = _load_cache(path)
        started = time.perf_counter()
        full_names = {id(module): name for name, module in self.named_modules()}
        twins: dict[str, FusedTwin] = {}
        renamed: dict[str, str] = {}
        for parent, attribute, linear, name in targets:
            twins[name] = quantize_parts(linear, settings.bits, settings.group_size, saved.get(name) if saved else None)
            setattr(parent, attribute, SplitLinear(linear, twins[name], self.river_rows))
            prefix = full_names[id(linear)]
            renamed.update({f"{prefix}.{p}": f"{prefix}.backbone.{p}" for p, _ in linear.named_parameters()})
        if saved is None:
            _save_cache(path, {name: twin_state(twin) for name, twin in twins.items()})
        self.river_hooks = [ExitRuleHooks(self.model.layers[index], index + 1, self.river_step)
                            for index in range(self.model.start_layer, self.model.end_layer)]
        logger.info("River: %d twins (%d-bit, group %d) %s in %.1f s; tau %.4g from %s", len(twins), settings.bits,
                    settings.group_size, "loaded from cache" if saved else "quantized with HQQ",
                    time.perf_counter() - started, settings.tau, settings.tau_source)
        return renamed


def _river_cache_dir() -> Path:
    from riverllm.loading import cache_dir

    return cache_dir() / "rivers"


def _load_cache(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache file is rebuilt, never trusted
        return None


def _save_cache(path: Path, state: dict) -> None:
    from riverllm.files import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda temp: torch.save(state, temp))


class RiverLlamaForCausalLM(RiverMixin, LlamaForCausalLM):
    """vLLM's LlamaForCausalLM (Llama, SmolLM2, ...) with River-LLM early exit."""


class RiverQwen2ForCausalLM(RiverMixin, Qwen2ForCausalLM):
    """vLLM's Qwen2ForCausalLM (Qwen2, Qwen2.5, Qwen2.5-Coder) with River-LLM early exit."""
