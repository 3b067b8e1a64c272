"""`RiverLM`: the library's front door. Load a model, build its Exit River, generate.

    import riverllm
    lm = riverllm.load("smollm2-135m")
    result = lm.generate("What is 7 * 8?", method="river", tau=0.9)
    print(result.text, result.exit_layers, result.tokens_per_s)
    for event in lm.stream("Tell me a joke"):
        print(event.text, end="", flush=True)

Everything user-facing is validated here, once, with `RiverError`s; the engine below trusts
its inputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from riverllm.chat_tokens import encode_chat
from riverllm.engine import DraftConfig, DraftStats, GenerationResult, RiverEngine, SamplingConfig, decode, decode_lossless
from riverllm.errors import RiverError
from riverllm.kernels.onednn import pack_projections
from riverllm.policy import DEFAULT_TAU, FALLBACK_TAU, ExitPolicy, Method, check_tau
from riverllm.river import HEAD_BITS, QuantConfig, build_river, keep_dequantized, low_bit_head
from riverllm.textstream import TextStream

Prompt = str | list[dict]  # plain text, or chat messages [{"role": ..., "content": ...}]
MAX_NEW_TOKENS_LIMIT = 32768


@dataclass
class StreamEvent:
    text: str  # new text since the previous event (may be empty while a character is incomplete)
    token_id: int | None
    exit_layer: int | None
    result: GenerationResult | None = None  # set on the last event only


MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MAX_DRAFT_TOKENS = 16
MAX_LOOKUP_TOKENS = 32
# Drafts per backbone pass when no profile says otherwise. On a CPU in float32, verifying 1-3 tokens
# costs one dense step but 4 or more cost ~1.8 (fp32 GEMM switches kernels at 4 rows), so 2 drafts
# are the sweet spot there (docs/lossless.md); a bfloat16 GEMM costs about the same for 1-8 rows
# (1.5B, bf16, one thread: 4 drafts 4.03 tok/s, 2 drafts 3.83) and a GPU verifies a few more tokens
# for almost nothing.
DEFAULT_DRAFT_TOKENS = {"cpu": 2, "cpu-bf16": 4, "cuda": 4}
# Prompt-lookup drafts per cycle where the context matches (docs/lossless.md): on a CPU a bfloat16
# verify pass over 1 + 7 rows costs about one step (measured best of 4/7/10/15 on the 0.5B); a GPU
# verifies 11 rows for about one step.
DEFAULT_DRAFT_LOOKUP = {"cpu": 7, "cuda": 10}
KERNELS = ("torch", "ggml")
DEFAULT_DRAFT_HEAD_BITS = 4
MAX_SEED = 2**63 - 1


def check_generation_options(method: str | Method = "river", tau: float | None = None, max_new_tokens: int = 128,
                             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                             bits: int | None = None, seed: int | None = None, head_bits: int | None = None,
                             draft_tokens: int | None = None, draft_confidence: float | None = None,
                             draft_lookup: int | None = None, **_ignored) -> Method:
    """Validate what can be validated without a model (so that a typo fails before a slow load)."""
    method = Method.parse(method, bits) if isinstance(method, str) else method
    if tau is not None:
        if not method.uses_tau:
            raise RiverError(f"--tau only applies to methods with an exit threshold, not '{method.name}'")
        method = Method(method.kind, method.bits, check_tau(tau), method.schedule)
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise RiverError(f"max-new-tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens}")
    if (not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE) or not 0 < top_p <= 1
            or top_k < 0):
        # logits / temperature overflows float32 for temperatures near 0 (and nan/inf are no values)
        raise RiverError(f"sampling settings out of range: temperature 0 (greedy) or {MIN_TEMPERATURE:g} to "
                         f"{MAX_TEMPERATURE:g}, 0 < top-p <= 1, top-k >= 0; got {temperature:g}, {top_p:g}, {top_k}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise RiverError(f"the seed must be between 0 and {MAX_SEED} (torch's generator range), got {seed}")
    if head_bits is not None and head_bits not in HEAD_BITS:
        raise RiverError(f"the low-bit LM head supports {', '.join(map(str, HEAD_BITS))} bits, got {head_bits}")
    if head_bits is not None and not (method.needs_river or method.kind == "dense"):
        raise RiverError(f"a low-bit LM head applies to dense, w, river and lossless methods, not '{method.name}'")
    if (draft_tokens is not None or draft_confidence is not None or draft_lookup is not None) \
            and method.kind != "lossless":
        raise RiverError(f"draft settings apply to the lossless method only, not '{method.name}'")
    if draft_tokens is not None and not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise RiverError(f"draft tokens must be between 1 and {MAX_DRAFT_TOKENS}, got {draft_tokens}")
    if draft_confidence is not None and not 0 <= draft_confidence < 1:
        raise RiverError(f"the draft confidence must be in [0, 1), got {draft_confidence:g}")
    if draft_lookup is not None and not 0 <= draft_lookup <= MAX_LOOKUP_TOKENS:
        raise RiverError(f"prompt-lookup drafts must be between 0 (off) and {MAX_LOOKUP_TOKENS}, got {draft_lookup}")
    return method


class RiverLM:
    def __init__(self, model: nn.Module, tokenizer, name: str = "custom", quant: QuantConfig = QuantConfig(),
                 progress: bool = False, river_cache_dir: Path | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.river_cache_dir = river_cache_dir  # where built rivers are kept between runs (None: nowhere)
        self.engine = RiverEngine(model)
        self.quant = quant
        self.progress = progress
        self._rivers: dict[QuantConfig, nn.ModuleList] = {}
        self._heads: dict[int, nn.Module] = {}
        self.model_type = getattr(model.config, "model_type", "")
        self.profile_tau: dict[int, float] = {}  # bits -> calibrated tau (from `riverllm calibrate`)
        self.profile_lossless: dict[int, tuple[float, int]] = {}  # bits -> (tau, drafts) (`--target speed`)
        self.gguf_path: Path | None = None  # the GGUF file the weights came from, if any (for ggml kernels)
        self.kernels = "torch"
        # "torch" kernels: on a CPU in bfloat16, the backbone and head weights packed for oneDNN
        # once (bit-identical to F.linear, 1.5-1.8x faster for a decoding step: kernels/onednn.py)
        self._torch_modules = pack_projections(list(self.engine.backbone), self.engine.head_linear)
        self.engine.use_kernels(*self._torch_modules)
        self._ggml = None

    @classmethod
    def load(cls, model: str | None = None, device: str | None = None, dtype: torch.dtype | None = None,
             bits: int = 4, group_size: int = 64, progress: bool = True, kernels: str = "torch") -> "RiverLM":
        from riverllm.loading import DEFAULT_MODEL, cache_dir, load_model, resolve_model

        spec = model or DEFAULT_MODEL
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        quant = QuantConfig(bits, group_size)  # validated before the (slow) load
        hf_model, tokenizer = load_model(spec, device=device, dtype=dtype, progress=progress)
        lm = cls(hf_model, tokenizer, name=spec, quant=quant, progress=progress, river_cache_dir=cache_dir() / "rivers")
        directory, gguf_file = resolve_model(spec, progress=False)
        lm.gguf_path = directory / gguf_file if gguf_file else None
        lm._load_profile()
        lm.use_kernels(kernels)
        return lm

    def _load_profile(self) -> None:
        from riverllm.profiles import load_lossless_profile, load_profile_taus

        self.profile_tau = load_profile_taus(self.name, self.quant.group_size)
        self.profile_lossless = load_lossless_profile(self.name, self.quant.group_size)

    # --- model facts ----------------------------------------------------------------------------

    @property
    def compute(self) -> str:
        """The backbone's dtype and, on CPU, torch's thread count now: what a speed was measured
        with (the summary line says it, since both change tokens/s by large factors on a CPU)."""
        dtype = str(self.engine.dtype).removeprefix("torch.")
        if self.engine.device.type != "cpu":
            return f"{dtype} on {self.engine.device}"
        threads = torch.get_num_threads()
        kernels = ", ggml kernels" if self.kernels == "ggml" else ""
        return f"{dtype}{kernels}, {threads} CPU thread{'s' if threads != 1 else ''}"

    @property
    def num_layers(self) -> int:
        return self.engine.num_layers

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    def default_tau(self, bits: int | None = None, lossless: bool = False) -> float:
        bits = bits or self.quant.bits
        if lossless and bits in self.profile_lossless:
            return self.profile_lossless[bits][0]
        if bits in self.profile_tau:
            return self.profile_tau[bits]
        return DEFAULT_TAU.get(self.model_type, FALLBACK_TAU)

    def tau_used(self, method: Method, tau: float | None) -> tuple[float | None, str]:
        """The threshold a generation runs with, and where it came from (for the summary line: a
        calibrated profile in the cache changes River's behaviour, and the user must see it)."""
        if not method.uses_tau:
            return None, ""
        if tau is not None or method.tau is not None:
            return (tau if tau is not None else method.tau), "request"
        lossless = method.kind == "lossless"
        profiled = method.bits in (self.profile_lossless if lossless else self.profile_tau)
        return self.default_tau(method.bits, lossless), "profile" if profiled else "default"

    def default_draft_tokens(self, bits: int) -> int:
        if bits in self.profile_lossless:
            return self.profile_lossless[bits][1]
        if self.engine.device.type == "cpu" and self.engine.dtype != torch.float32:
            return DEFAULT_DRAFT_TOKENS["cpu-bf16"]
        return DEFAULT_DRAFT_TOKENS.get(self.engine.device.type, DEFAULT_DRAFT_TOKENS["cuda"])

    def default_draft_lookup(self) -> int:
        return DEFAULT_DRAFT_LOOKUP.get(self.engine.device.type, DEFAULT_DRAFT_LOOKUP["cuda"])

    def eos_token_ids(self) -> tuple[int, ...]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id if self.model.generation_config else None,
                       self.tokenizer.eos_token_id):
            if source is None:
                continue
            ids.update(source if isinstance(source, (list, tuple)) else [source])
        return tuple(sorted(ids))

    def river(self, bits: int | None = None, group_size: int | None = None) -> nn.ModuleList:
        """The Exit River for this bit width, built on first use and kept."""
        config = QuantConfig(bits or self.quant.bits, group_size or self.quant.group_size, self.quant.backend)
        if config not in self._rivers:
            river = build_river(self.engine.layers, config, progress=self.progress, cache_dir=self.river_cache_dir)
            keep_dequantized(river, self.engine.dtype)  # twins with no int4 kernel: dequantized once, not per call
            self._rivers[config] = river
        return self._rivers[config]

    def low_bit_head(self, bits: int) -> nn.Module:
        """A low-bit copy of the LM head (`river.low_bit_head`), built on first use and kept."""
        if bits not in self._heads:
            self._heads[bits] = low_bit_head(self.engine.lm_head, bits, self.quant.group_size)
        return self._heads[bits]

    def use_kernels(self, kernels: str) -> None:
        """What the step multiplies with. "torch": the dequantized weights and PyTorch's kernels
        (the default, and the reference the tests compare with transformers). "ggml" (CPU, GGUF
        models): the backbone and the LM head on the file's own quantized blocks and llama.cpp's
        kernels (riverllm.kernels); twins and low-bit heads stay on PyTorch's int4 kernel, which
        is faster than ggml's 4-bit formats here; prompts run on bfloat16 copies of the backbone
        and twin weights (PyTorch GEMMs), built when first needed. Activations are quantized to 8 bits per block
        inside ggml's products, so tokens can differ from "torch" as llama.cpp's do."""
        if kernels not in KERNELS:
            raise RiverError(f"kernels must be one of {', '.join(KERNELS)}, got '{kernels}'")
        if kernels == "ggml":
            if self.engine.device.type != "cpu" or self.gguf_path is None:
                raise RiverError("the ggml kernels run GGUF models on the CPU only")
            from riverllm.kernels.gguf_linear import GGMLKernels

            if self._ggml is None:
                self._ggml = GGMLKernels(self.gguf_path, self.engine)
            self.engine.use_kernels(self._ggml.backbone, self._ggml.head, self._ggml.twins)
        else:
            backbone, head = self._torch_modules
            self.engine.use_kernels(backbone, head)
        self.kernels = kernels

    def free_backbone(self, keep_layers: int) -> None:
        """Drop backbone layers beyond `keep_layers` from memory; tokens then exit there at the latest.
        The river must exist first (it is built from the backbone's weights)."""
        if not 0 <= keep_layers <= self.num_layers:
            raise RiverError(f"keep_layers must be in 0..{self.num_layers}, got {keep_layers}")
        if not self._rivers:
            self.river()
        for index in range(keep_layers, self.num_layers):
            self.engine.layers[index] = nn.Identity()  # the twins keep the shared norms alive
        self.engine.free_layers(keep_layers)
        backbone, head = self._torch_modules
        self._torch_modules = ([w if i < keep_layers else None for i, w in enumerate(backbone)], head)
        if self._ggml is not None:  # its modules hold the dropped layers' float weights as fallbacks
            self._ggml.backbone = [w if i < keep_layers else None for i, w in enumerate(self._ggml.backbone)]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- prompts --------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: Prompt, raw: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RiverError("the prompt is empty: pass some text with --prompt")
            if raw or not self.has_chat_template:
                return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            prompt = [{"role": "user", "content": prompt}]
        if not prompt:
            raise RiverError("the message list is empty: send at least one message")
        if not self.has_chat_template:
            # Messages are user text: special-token text in them stays plain (chat_tokens.py).
            text = "\n".join(str(m.get("content", "")) for m in prompt)
            return self.tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]
        return encode_chat(self.tokenizer, prompt)

    # --- generation -----------------------------------------------------------------------------

    def _policy(self, method: str | Method, tau: float | None, bits: int | None, min_exit_layer: int,
                max_backbone_layers: int | None, exit_rule: str = "per-row",
                ) -> tuple[Method, ExitPolicy, nn.ModuleList | None]:
        method = check_generation_options(method, tau, bits=bits)
        if max_backbone_layers is not None and not 0 <= max_backbone_layers <= self.num_layers:
            raise RiverError(f"max_backbone_layers must be in 0..{self.num_layers}, got {max_backbone_layers}")
        if method.kind == "static" and not 0 <= method.depth <= self.num_layers:
            raise RiverError(f"{method.name}: the exit layer must be in 0..{self.num_layers}")
        if method.kind == "mixed" and method.full_precision_last > self.num_layers:
            raise RiverError(f"{method.name}: the model has only {self.num_layers} layers")
        if not 0 <= min_exit_layer < self.num_layers:
            raise RiverError(f"min_exit_layer must be in 0..{self.num_layers - 1}, got {min_exit_layer}")
        limit = self.engine.resident_layers
        if limit < self.num_layers and method.kind != "w":
            max_backbone_layers = min(limit, max_backbone_layers if max_backbone_layers is not None else limit)
            if method.kind in ("dense", "mixed"):
                raise RiverError(f"{method.name} needs the last backbone layers, but only the first {limit} of "
                                 f"{self.num_layers} are in memory")
        policy = method.policy(self.default_tau(method.bits, method.kind == "lossless"), min_exit_layer,
                               max_backbone_layers, exit_rule)
        river = self.river(method.bits) if method.needs_river else None
        return method, policy, river

    def _check_lengths(self, prompt_ids: Sequence[list[int]], max_new_tokens: int) -> int:
        longest = max(len(ids) for ids in prompt_ids)
        if longest >= self.context_length:
            raise RiverError(f"the prompt has {longest} tokens but the model's context window is "
                             f"{self.context_length}: shorten it")
        return min(max_new_tokens, self.context_length - longest)

    def stream_batch(self, prompts: Sequence[Prompt], method: str | Method = "river", tau: float | None = None,
                     max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int | None = None, stop: Sequence[str] | None = None, raw: bool = False,
                     bits: int | None = None, min_exit_layer: int = 1, max_backbone_layers: int | None = None,
                     ignore_eos: bool = False, use_cuda_graphs: bool | None = None,
                     exit_rule: str = "per-row", head_bits: int | None = None, draft_tokens: int | None = None,
                     draft_confidence: float | None = None, draft_lookup: int | None = None,
                     ) -> Iterator[tuple[int, StreamEvent]]:
        """The one generation loop behind `generate`, `generate_batch` and `stream`:
        yields (row, event) as tokens arrive; each row's last event carries its result.

        Rows decode as one batch with per-row exits (exit_rule="per-row"), so each row's answer is
        the one it gets alone; `seed` seeds every row's own generator. use_cuda_graphs: None picks
        the CUDA-graph runner on a GPU and the eager engine elsewhere.

        head_bits: read the LM head as a low-bit copy (lossy; off by default, except for the
        lossless method's drafts, which default to 4 bits since verification makes them safe).
        draft_tokens / draft_confidence: the lossless method's drafts per cycle and the top-1
        probability below which a row stops drafting (engine/lossless.py). draft_lookup: up to this
        many drafts copied from the context where its last tokens occurred before (prompt lookup),
        River drafting where they did not; None: the device's default, 0: off."""
        if not prompts:
            raise RiverError("no prompts given")
        check_generation_options(method, tau, max_new_tokens, temperature, top_p, top_k, bits, seed, head_bits,
                                 draft_tokens, draft_confidence, draft_lookup)
        method, policy, river = self._policy(method, tau, bits, min_exit_layer, max_backbone_layers, exit_rule)
        used_tau, tau_source = self.tau_used(method, tau)
        prompt_ids = [self.encode(p, raw) for p in prompts]
        budget = self._check_lengths(prompt_ids, max_new_tokens)
        streams = [TextStream(self.tokenizer, stop or ()) for _ in prompts]
        exit_layers: list[list[int]] = [[] for _ in prompts]
        times: list[list[float]] = [[] for _ in prompts]
        ids: list[list[int]] = [[] for _ in prompts]
        eos = () if ignore_eos else self.eos_token_ids()
        done = [False] * len(prompts)
        sampling = SamplingConfig(temperature, top_p, top_k, seed)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        graphs = self.engine.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        pushed: dict[int, str] = {}  # text each row's newest token made safe to show

        def check(row: int, generated: list[int]) -> bool:
            """Decode the row's newest token once; a stop string in it ends the row."""
            pushed[row] = streams[row].push(generated[-1])
            return streams[row].stopped

        lossless = method.kind == "lossless"
        if lossless:
            head_bits = DEFAULT_DRAFT_HEAD_BITS if head_bits is None else head_bits
            drafting = DraftConfig(draft_tokens or self.default_draft_tokens(method.bits), draft_confidence or 0.0,
                                   lookup_tokens=self.default_draft_lookup() if draft_lookup is None else draft_lookup)
            draft_stats = [DraftStats() for _ in prompts]
            events = decode_lossless(self.engine, prompt_ids, policy, river, budget, sampling, eos, pad, check,
                                     drafting, self.low_bit_head(head_bits) if head_bits else None, draft_stats)
        else:
            events = decode(self.engine, prompt_ids, policy, river, budget, sampling, eos, pad, check,
                            use_cuda_graphs=graphs, lm_head=self.low_bit_head(head_bits) if head_bits else None)
        for event in events:
            for row, token in enumerate(event.tokens):
                if done[row] or (event.present is not None and not event.present[row]):
                    continue
                ids[row].append(token)
                exit_layers[row].append(event.exit_layers[row])
                times[row].append(event.seconds if event.row_seconds is None else event.row_seconds[row])
                delta = pushed.pop(row, "")
                result = None
                if event.finished[row] or len(ids[row]) >= budget:
                    done[row] = True
                    delta += streams[row].finish()
                    hit_eos = bool(eos) and token in eos
                    result = GenerationResult(
                        text=streams[row].text, token_ids=ids[row], exit_layers=exit_layers[row],
                        token_times=times[row],
                        finish_reason="stop" if (hit_eos or streams[row].stopped) else "length",
                        prompt_tokens=len(prompt_ids[row]), num_layers=self.num_layers, method=method.name,
                        tau=used_tau, tau_source=tau_source, compute=self.compute,
                        extra={"drafting": {**draft_stats[row].to_dict(), "draft_tokens": drafting.max_drafts,
                                            "draft_lookup": drafting.lookup_tokens}} if lossless else {},
                    )
                yield row, StreamEvent(delta, token, event.exit_layers[row], result)

    @torch.no_grad()
    def teacher_forced(self, ids: Sequence[int], prompt_len: int, method: str | Method = "dense",
                       tau: float | None = None, bits: int | None = None, min_exit_layer: int = 1,
                       ) -> tuple[torch.Tensor, list[int]]:
        """Score a fixed continuation token by token, exactly as decoding would run it.

        Prefills ids[:prompt_len] (one common depth), then feeds ids[prompt_len:-1] one at a time,
        so every scored position gets its own exit decision. Returns float32 logits [n, vocab]
        where logits[i] predicts ids[prompt_len + i], and the exit layer of each of those steps.
        """
        logits, exits = self.teacher_forced_batch([ids], [prompt_len], method, tau, bits, min_exit_layer)[0]
        return logits, exits

    @torch.no_grad()
    def teacher_forced_batch(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                             method: str | Method = "dense", tau: float | None = None, bits: int | None = None,
                             min_exit_layer: int = 1, head_bits: int | None = None,
                             ) -> list[tuple[torch.Tensor, list[int]]]:
        """`teacher_forced` for many sequences at once, as one batch with per-row exits: each
        row's logits and exits are those it gets alone. Prior strategies run one row at a time
        (they decide per batch). head_bits: read a low-bit copy of the LM head."""
        for ids, prompt_len in zip(sequences, prompt_lens):
            if not 1 <= prompt_len < len(ids):
                raise RiverError(f"prompt_len must be in 1..{len(ids) - 1}, got {prompt_len}")
            if len(ids) > self.context_length:
                raise RiverError(f"{len(ids)} tokens do not fit the context window of {self.context_length}")
        if check_generation_options(method, tau, head_bits=head_bits).kind == "lossless":
            method, tau = "dense", None  # lossless decoding's output distribution is dense's, by construction
        _, policy, river = self._policy(method, tau, bits, min_exit_layer, None)
        if policy.kv_strategy != "river" and len(sequences) > 1:
            return [self.teacher_forced_batch([ids], [n], method, tau, bits, min_exit_layer, head_bits)[0]
                    for ids, n in zip(sequences, prompt_lens)]
        head = self.low_bit_head(head_bits) if head_bits else None
        engine = self.engine
        device = engine.device
        cache = engine.new_cache(len(sequences), max(len(ids) for ids in sequences),
                                 track_filled=policy.kv_strategy != "river")
        cache.prompt_lengths = list(prompt_lens)
        output = engine.prefill([list(ids[:n]) for ids, n in zip(sequences, prompt_lens)], cache, policy, river,
                                lm_head=head)
        logits: list[list[torch.Tensor]] = [[] for _ in sequences]
        exits: list[list[int]] = [[] for _ in sequences]
        rows = list(range(len(sequences)))
        while rows:
            for i, row in enumerate(rows):
                logits[row].append(output.logits[i].float())
                exits[row].append(output.exit_layers[i])
            # A row is done once it has a prediction for each of its continuation tokens (its
            # last token is never fed: nothing follows it to predict).
            rows = [row for row in rows if cache.lengths[row] < len(sequences[row]) - 1]
            if not rows:
                break
            tokens = torch.tensor([[sequences[row][cache.lengths[row]]] for row in rows], device=device)
            output = engine.forward(tokens, cache, policy, river, rows=rows, lm_head=head)
        return [(torch.stack(row_logits), row_exits) for row_logits, row_exits in zip(logits, exits)]

    def stream(self, prompt: Prompt, **options) -> Iterator[StreamEvent]:
        for _, event in self.stream_batch([prompt], **options):
            yield event

    def generate_batch(self, prompts: Sequence[Prompt], **options) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(prompts)
        for row, event in self.stream_batch(prompts, **options):
            if event.result is not None:
                results[row] = event.result
        return results  # type: ignore[return-value]

    def generate(self, prompt: Prompt, **options) -> GenerationResult:
        return self.generate_batch([prompt], **options)[0]


def load(model: str | None = None, **options) -> RiverLM:
    """Load a packaged name, a HuggingFace model directory or a .gguf file, ready to generate."""
    return RiverLM.load(model, **options)
