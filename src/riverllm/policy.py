"""When a token leaves the backbone: River-LLM's state-transition-similarity rule.

After backbone block l, s_l = cos(h_{l-1}, h_l), the cosine between the block's input and output
residual states in fp32. A block that barely turns the residual stream has little left to add,
so the token exits at the first l > `min_exit_layer` with s_l > tau, and the low-bit river runs
layers l+1..L. Several tokens deciding together (a prompt in prefill, a batch in decoding) use
the minimum of their similarities: the group exits only when its least settled token may.

A `Method` names a whole decoding recipe as users write it on the command line:
`dense` (backbone only), `w4` (every layer as its 4-bit twin), `river` / `river:0.9` /
`river3:0.95` (River-LLM with the river's bit width and tau), `lossless` / `lossless:0.9` (River
drafts, the full-precision backbone verifies: dense's output; engine/lossless.py), and the prior
ways of filling the KV hole that an exited token leaves (SPEC.md section 1), each reading the LM
head at the exit layer:
`recompute:TAU` (EE-LLM), `propagate:TAU` (CALM), `mask:TAU` (D-LLM), `monotonic:START-END[@N]`
(SkipDecode: generated token t runs a depth falling linearly from START to END layers over N
tokens, 256 by default; the prompt runs full depth).
`w4-last8` is no early exit: a static mixed-precision model (every token runs the twins of the
first L-8 layers and the backbone's last 8), the control that asks whether River's exits beat
simply keeping the layers whose twins err most at full precision (docs/study.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from riverllm.errors import RiverError

# Chosen on the packaged models (SPEC.md section 2 and docs/tau.md): at 0.9 the SmolLM2 and
# Qwen2.5 backbones still run only the first 3-5 layers on average, and tau in 0.9-0.95 is the
# "near-lossless" end the paper recommends for small models. `riverllm calibrate` replaces these
# with a measured value per model and bit width.
DEFAULT_TAU = {"llama": 0.9, "qwen2": 0.9, "qwen3": 0.9, "mistral": 0.9, "gemma3_text": 0.9, "phi3": 0.9}
FALLBACK_TAU = 0.9


@dataclass(frozen=True)
class ExitPolicy:
    """Decides, after each backbone layer, whether the token(s) leave for the river."""

    tau: float = math.inf  # inf: never exit on similarity
    min_exit_layer: int = 1  # exits are allowed after layers min_exit_layer+1 .. L
    max_backbone_layers: int | None = None  # forced exit here (deeper backbone layers may be freed)
    force_exit_layer: int | None = None  # exit here whatever the similarity (w4: 0; bench profiles)
    # What happens to the layers an exited token skips: "river" (its twins run them, KV included),
    # or a prior strategy: "recompute", "propagate", "mask" (see engine/core.py).
    kv_strategy: str = "river"
    # SkipDecode: (start_depth, end_depth, ramp_tokens); depth is a function of the generated index.
    depth_schedule: tuple[int, int, int] | None = None
    # "per-row": each row of a batch leaves by its own similarity (its output is what it gets
    # alone); "batch-min": the paper's rule, the batch leaves when its least settled row may.
    # The prior strategies always decide per batch.
    exit_rule: str = "per-row"
    # A static mix instead of exits: layers 1..L-K run as twins, the last K on the backbone, for
    # every token (`w4-last8`). None: off.
    full_precision_last: int | None = None

    def __post_init__(self) -> None:
        if math.isnan(self.tau):
            raise RiverError("tau must be a number between -1 and 1 (or above 1 to never exit), got nan")
        if self.min_exit_layer < 0:
            raise RiverError(f"min_exit_layer must be >= 0, got {self.min_exit_layer}")
        if self.max_backbone_layers is not None and self.max_backbone_layers < 0:
            raise RiverError(f"max_backbone_layers must be >= 0, got {self.max_backbone_layers}")
        if self.full_precision_last is not None and (self.full_precision_last < 0 or self.needs_similarity
                                                     or self.force_exit_layer is not None or self.kv_strategy != "river"):
            raise RiverError("full_precision_last (a static mix of twins and backbone layers) takes a count >= 0 "
                             "and no exits")
        if self.exit_rule not in EXIT_RULES:
            raise RiverError(f"exit_rule must be one of {', '.join(EXIT_RULES)}, got '{self.exit_rule}'")

    @property
    def needs_similarity(self) -> bool:
        return self.force_exit_layer is None and self.tau != math.inf

    def scheduled_depth(self, generated_index: int, num_layers: int) -> int | None:
        """SkipDecode's depth for the generated token `generated_index` (None: not scheduled)."""
        if self.depth_schedule is None:
            return None
        if generated_index < 0:  # the prompt
            return num_layers
        start, end, ramp = self.depth_schedule
        progress = min(generated_index, ramp - 1) / max(ramp - 1, 1)
        return min(num_layers, round(start + (end - start) * progress))

    def twin_layers(self, num_layers: int) -> int:
        """How many layers, from the first, every token runs as twins before the backbone (0
        unless this is a static mix)."""
        if self.full_precision_last is None:
            return 0
        if self.full_precision_last > num_layers:
            raise RiverError(f"the last {self.full_precision_last} layers at full precision: the model has only "
                             f"{num_layers} layers")
        return num_layers - self.full_precision_last

    def start_layer(self) -> int | None:
        """An exit decided before any backbone layer runs (0 means: river only)."""
        if self.force_exit_layer is not None:
            return self.force_exit_layer
        if self.max_backbone_layers == 0:
            return 0
        return None

    def rule_at(self, layer: int) -> str:
        """What the rule does after backbone block `layer` (1-based), before any similarity:
        "leave" (a forced exit), "stay" (no exit possible here: no cosine is computed) or
        "compare" (leave when the similarity passes `leaves`)."""
        if self.force_exit_layer is not None:
            return "leave" if layer >= self.force_exit_layer else "stay"
        if self.max_backbone_layers is not None and layer >= self.max_backbone_layers:
            return "leave"
        if self.tau == math.inf or layer <= self.min_exit_layer:
            return "stay"
        return "compare"

    def leaves(self, similarity, layer: int):
        """The threshold test after block `layer`, on a float or a tensor of per-row similarities."""
        return similarity > self.tau

    def exits_after(self, layer: int, similarity: float) -> bool:
        """`layer` is 1-based: the backbone layer that just ran, `similarity` its s_l."""
        rule = self.rule_at(layer)
        return rule == "leave" or (rule == "compare" and bool(self.leaves(similarity, layer)))


EXIT_RULES = ("per-row", "batch-min")


_METHOD = re.compile(r"^(?P<kind>dense|w|river|lossless|recompute|propagate|mask)(?P<bits>\d+)?(?::(?P<tau>[-+0-9.eE]+|inf))?$")
_MONOTONIC = re.compile(r"^monotonic:(?P<start>\d+)-(?P<end>\d+)(?:@(?P<ramp>\d+))?$")
_STATIC = re.compile(r"^river(?P<bits>\d+)?@(?P<depth>\d+)$")
_MIXED = re.compile(r"^w(?P<bits>\d+)-last(?P<last>\d+)$")
PRIOR_STRATEGIES = ("recompute", "propagate", "mask")


@dataclass(frozen=True)
class Method:
    """A decoding recipe: `dense`, `w<bits>`, or `river[<bits>][:tau]`."""

    kind: str  # dense | w | river | lossless | static | mixed | recompute | propagate | mask | monotonic
    bits: int = 4
    tau: float | None = None  # exit threshold; None means the model's default
    schedule: tuple[int, int, int] | None = None  # monotonic only
    # static (`river@K`): every token leaves after backbone layer K, whatever its similarity: the
    # control that tells whether River's adaptive exits beat a fixed depth of the same cost.
    depth: int | None = None
    # mixed (`w4-last8`): the last `full_precision_last` layers on the backbone, the others twins.
    full_precision_last: int | None = None

    @property
    def uses_tau(self) -> bool:
        return self.kind in ("river", "lossless") + PRIOR_STRATEGIES

    @classmethod
    def parse(cls, text: str, bits: int | None = None) -> "Method":
        text = text.strip()
        if monotonic := _MONOTONIC.match(text):
            start, end = int(monotonic["start"]), int(monotonic["end"])
            if end > start or end < 1:
                raise RiverError(f"monotonic:START-END needs START >= END >= 1 (depth never grows), got '{text}'")
            return cls("monotonic", bits or 4, None, (start, end, int(monotonic["ramp"] or 256)))
        if static := _STATIC.match(text):
            return cls("static", int(static["bits"]) if static["bits"] else (bits or 4), depth=int(static["depth"]))
        if mixed := _MIXED.match(text):
            return cls("mixed", int(mixed["bits"]), full_precision_last=int(mixed["last"]))
        match = _METHOD.match(text)
        takes_bits = match and match["kind"] in ("w", "river", "lossless")
        if (not match or (match["kind"] == "w" and not match["bits"]) or (match["bits"] and not takes_bits)
                or (match["kind"] in ("dense", "w") and match["tau"])):
            raise RiverError(f"unknown method '{text}': use dense, w4 (w2/w3/w8), river[:TAU], river3:TAU, "
                             "river@K (fixed exit layer), w4-lastK (the last K layers at full precision), lossless[:TAU] (exact: River drafts, the backbone "
                             "verifies), recompute:TAU, propagate:TAU, mask:TAU or monotonic:START-END")
        kind = match["kind"]
        method_bits = int(match["bits"]) if match["bits"] else (bits or 4)
        tau = check_tau(float(match["tau"])) if match["tau"] else None
        return cls(kind, method_bits, tau)

    @property
    def name(self) -> str:
        if self.kind == "dense":
            return "dense"
        if self.kind == "w":
            return f"w{self.bits}"
        if self.kind == "monotonic":
            start, end, ramp = self.schedule
            return f"monotonic:{start}-{end}" + ("" if ramp == 256 else f"@{ramp}")
        if self.kind == "static":
            return f"river{'' if self.bits == 4 else self.bits}@{self.depth}"
        if self.kind == "mixed":
            return f"w{self.bits}-last{self.full_precision_last}"
        bits = "" if self.bits == 4 or self.kind not in ("river", "lossless") else str(self.bits)
        return f"{self.kind}{bits}" + ("" if self.tau is None else f":{self.tau:g}")

    @property
    def needs_river(self) -> bool:
        return self.kind in ("w", "river", "static", "mixed", "lossless")

    def policy(self, default_tau: float, min_exit_layer: int = 1, max_backbone_layers: int | None = None,
               exit_rule: str = "per-row") -> ExitPolicy:
        if self.kind == "dense":
            return ExitPolicy()
        if self.kind == "w":
            return ExitPolicy(force_exit_layer=0)
        if self.kind == "monotonic":
            return ExitPolicy(kv_strategy="mask", depth_schedule=self.schedule)
        if self.kind == "static":
            return ExitPolicy(force_exit_layer=self.depth)
        if self.kind == "mixed":
            return ExitPolicy(full_precision_last=self.full_precision_last)
        tau = default_tau if self.tau is None else self.tau
        # lossless: this is the drafts' policy (the backbone verifies every token in full)
        strategy = "river" if self.kind in ("river", "lossless") else self.kind
        return ExitPolicy(tau=tau, min_exit_layer=min_exit_layer, max_backbone_layers=max_backbone_layers,
                          kv_strategy=strategy, exit_rule=exit_rule)


def check_tau(tau: float) -> float:
    """Reject values that can only be typos; tau > 1 (never exit) and < -1 (always) are meaningful."""
    if math.isnan(tau) or not -10.0 <= tau <= 10.0:
        raise RiverError(f"tau must lie in [-10, 10] (cosines are in [-1, 1]; >1 never exits, <-1 always), got {tau}")
    return tau
