"""`riverllm calibrate`: pick tau from a fidelity target instead of by hand.

    result = calibrate(riverllm.load("smollm2-135m"), Target("agree", 0.9))
    print(result.tau, result.measured.mean_exit_layer)

The paper sets tau by hand per model and task. Here the user states how close to dense the river
must stay, as a fidelity target on plain text (see fidelity.py): `agree` (share of positions whose
greedy token is dense's) or `kl` (mean KL(dense || river)). Calibration finds the lowest tau,
i.e. the earliest exits and the least full-precision work, whose teacher-forced measurement on
calibration text meets the target, and stores it in a per-model profile that `riverllm.load`
reads: `lm.default_tau(bits)` returns it, so generate, eval, serve (and every API call that
passes no tau) use it.

How, cheaply (docs/calibrate.md has the whole argument):

1. One dense pass over each calibration window records s_l, the similarity the exit rule reads,
   for every token and layer, and dense's reference next-token distributions (fidelity.Reference;
   see `dense_pass` for why one parallel pass is enough in float32).
2. Proposal: for any tau the similarities predict each position's exit layer without running
   the river. The prediction is not exact: with the river, earlier tokens' deep K/V come from the
   twins, which moves later tokens' backbone states a little. So it only *proposes* candidates:
   taus whose predicted mean exit layers are spread from the earliest possible exit to never.
3. Search: a binary search over the candidates (ordered by tau, hence by exit depth), each
   probe a real teacher-forced measurement of the river against the reference. Fidelity is
   assumed to grow with tau (it does on average: a higher tau only keeps tokens longer in the
   full-precision backbone); what the search returns is verified, not assumed: the chosen tau
   was measured to meet the target and the next more aggressive candidate to miss it.
   "Never exit" (tau above 1) equals dense exactly and is the fallback that always qualifies.

Profiles are JSON files in `cache_dir()/profiles/` (RIVERLLM_CACHE moves them), one per model,
one entry per bit width and group size, each recording the tau, the target, the text, the
measurement, the date and the riverllm version. They are written atomically.
"""

from __future__ import annotations

import datetime
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from riverllm.errors import RiverError
from riverllm.fidelity import Fidelity, Reference, References, Segment, final_hidden_states, measure, stepwise_reference
from riverllm.policy import ExitPolicy
from riverllm.profiles import write_profile_entry

if TYPE_CHECKING:
    from riverllm.api import RiverLM

NEVER_EXIT_TAU = 1.5  # above any cosine: the river never runs, the output is dense's

# The default calibration text: Brown corpus windows held out from everything `riverllm eval`
# reads. The eval's ppl task (and the fidelity measured on it) reads the first 8 * (16 + window)
# characters of documents in genre-interleaved order, the first documents of each genre first.
# Calibration reads the *last* documents of each genre (genre-interleaved too), and only their
# text after HELD_OUT_OFFSET characters (every Brown document has over 10,000). So the two share
# no character for any ppl window up to 1008 tokens, whatever the number of windows; and beyond
# that only if ppl reads one of calibration's documents (tests/test_calibrate.py checks this).
HELD_OUT_OFFSET = 8192
DEFAULT_TOKENS = 256  # scored positions: agree to about +-0.02 (one standard error), a minute on a CPU
DEFAULT_WINDOW = 32  # scored tokens per window: 8 windows from 8 genres (texts vary more than positions)
DEFAULT_PREFILL = 16  # tokens of context prefilled before each window's scored tokens
CANDIDATES = 15  # taus proposed from the similarity pass (4 probes of binary search)


# --- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What "close enough to dense" means: agree >= value, or kl <= value."""

    metric: str  # "agree" | "kl"
    value: float

    @classmethod
    def from_options(cls, agree: float | None, kl: float | None) -> Target:
        if (agree is None) == (kl is None):
            raise RiverError("give exactly one target: --target-agree A (0 < A <= 1), --target-kl K (K > 0) or "
                             "--target speed")
        if agree is not None:
            if not 0 < agree <= 1:  # also catches nan
                raise RiverError(f"--target-agree is a share of positions in (0, 1], e.g. 0.9; got {agree}")
            return cls("agree", agree)
        if not 0 < kl < math.inf:
            raise RiverError(f"--target-kl is a mean KL divergence in nats, > 0 (e.g. 0.05); got {kl}")
        return cls("kl", kl)

    def met_by(self, fidelity: Fidelity) -> bool:
        if self.metric == "agree":
            return fidelity.agree >= self.value
        return fidelity.kl <= self.value

    def certainly_missed(self, partial: Fidelity, total_positions: int) -> bool:
        """True when no result on the positions still to come can meet the target: a probe that
        has already failed stops early (exactly: both sums only grow)."""
        if self.metric == "agree":
            return partial.positions - partial.agreeing > (1 - self.value) * total_positions
        return partial.kl_sum > self.value * total_positions

    def describe(self) -> str:
        return f"agree >= {self.value:g}" if self.metric == "agree" else f"kl <= {self.value:g}"


# --- calibration text ---------------------------------------------------------------------------


def heldout_documents(progress: bool = False) -> list[dict]:
    """Brown documents for calibration, genre-interleaved from the last document of each genre
    backwards, each cut to its text after HELD_OUT_OFFSET characters."""
    from riverllm.eval.tasks import brown_documents

    documents = brown_documents(progress)
    by_genre: dict[str, list[dict]] = {}
    for document in sorted(documents, key=lambda d: d["id"]):
        by_genre.setdefault(document["id"][1], []).append(document)
    rounds = max(len(docs) for docs in by_genre.values())
    order = [docs[-1 - i] for i in range(rounds) for _, docs in sorted(by_genre.items()) if i < len(docs)]
    return [{"id": d["id"], "text": d["text"][HELD_OUT_OFFSET:]} for d in order]


def read_text_file(text_file: Path | str) -> tuple[Path, str]:
    """The --text file's path and contents, checked before any model is loaded."""
    path = Path(text_file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RiverError(f"cannot read --text {path} ({type(error).__name__}); pass a UTF-8 text file") from None
    if not text.strip():
        raise RiverError(f"--text {path} is empty; pass a file with some text")
    return path, text


def windows_from_ids(ids: list[int], key: str, tokens: int, window: int, prefill: int) -> list[Segment]:
    """Consecutive windows of prefill + window tokens from one token stream, `tokens` scored in all."""
    segments = []
    start = 0
    while tokens > 0 and start + prefill + 1 < len(ids):
        scored = min(window, tokens, len(ids) - start - prefill)
        segments.append(Segment(f"{key}@{start}", ids[start:start + prefill + scored], prefill))
        tokens -= scored
        start += prefill + scored
    return segments


def calibration_segments(lm: RiverLM, text_file: Path | None = None, tokens: int = DEFAULT_TOKENS,
                         window: int = DEFAULT_WINDOW, prefill: int = DEFAULT_PREFILL,
                         progress: bool = False) -> tuple[list[Segment], dict]:
    """The windows calibration scores, and a description of the text for the profile."""
    if tokens < 1 or window < 1 or prefill < 1:
        raise RiverError("--tokens, the window and the prefill must be at least 1")
    if text_file is not None:
        path, text = read_text_file(text_file)
        ids = lm.encode(text, raw=True)
        segments = windows_from_ids(ids, path.name, tokens, window, prefill)
        if not segments:
            raise RiverError(f"--text {path} has {len(ids)} tokens; it needs more than {prefill + 1}")
        described = {"source": "file", "path": str(path.resolve()),
                     "sha256": hashlib.sha256(text.encode()).hexdigest()}
    else:
        from riverllm.eval.tasks import BROWN_PACKAGE

        segments = []
        for document in heldout_documents(progress):
            if tokens <= 0:
                break
            ids = lm.encode(document["text"], raw=True)[: prefill + window]
            found = windows_from_ids(ids, f"brown/{document['id']}", tokens, window, prefill)
            segments += found
            tokens -= sum(s.positions for s in found)
        described = {"source": BROWN_PACKAGE, "documents": [s.key for s in segments],
                     "held_out": f"last documents of each genre, text after character {HELD_OUT_OFFSET}"}
    described.update(positions=sum(s.positions for s in segments), window=window, prefill=prefill)
    return segments, described


# --- proposing candidates from one similarity pass -------------------------------------------------


@torch.no_grad()
def dense_pass(lm: RiverLM, segment: Segment) -> tuple[torch.Tensor, Reference]:
    """One dense forward over the whole segment: s_l of every token at every backbone layer
    [tokens, L], and dense's reference for the segment's positions, read off the same pass.

    Dense is causal, so one parallel pass computes what teacher forcing computes step by step,
    up to rounding: in float32 the difference is far below anything the metrics resolve, and
    calibration saves the slowest pass. In half precision it is not (the two kernels round
    differently at 8 mantissa bits), so there the reference is computed step by step."""
    engine = lm.engine
    cache = engine.new_cache(1, len(segment.ids))
    with final_hidden_states(lm) as captured:
        output = engine.forward(torch.tensor([segment.ids], device=engine.device), cache, ExitPolicy(),
                                all_logits=True, record_similarities=True)
    similarities = torch.stack([s[0] for s in output.similarities], dim=1).float().cpu()
    if engine.dtype == torch.float32:
        reference = Reference(captured[0][0, segment.prompt_len - 1:-1])
    else:
        reference = stepwise_reference(lm, segment)
    return similarities, reference


def exit_thresholds(similarities: torch.Tensor, prompt_len: int, min_exit_layer: int) -> torch.Tensor:
    """Per teacher-forced position, the running maximum of s_l over the layers where an exit is
    allowed [positions, L - min_exit_layer]: the position exits after layer min_exit_layer + 1 + c,
    c = the number of entries <= tau (never when all are)."""
    allowed = similarities[:, min_exit_layer:]
    prefill = allowed[:prompt_len].min(dim=0).values  # the prompt exits as one: its least settled token
    steps = allowed[prompt_len:-1]  # the tokens fed one by one predict the positions after the first
    return torch.cat([prefill[None], steps]).cummax(dim=1).values


def predicted_mean_exit(thresholds: torch.Tensor, taus: torch.Tensor, min_exit_layer: int, num_layers: int):
    """Mean predicted exit layer for each tau in `taus`."""
    counts = torch.searchsorted(thresholds.contiguous(), taus.expand(len(thresholds), -1).contiguous(), right=True)
    return (min_exit_layer + 1 + counts).clamp(max=num_layers).float().mean(dim=0)


def propose_taus(thresholds: torch.Tensor, min_exit_layer: int, num_layers: int, count: int = CANDIDATES
                 ) -> list[tuple[float, float]]:
    """(tau, predicted mean exit layer) for up to `count` taus whose predicted depths are spread
    evenly from the earliest exit to the deepest a finite tau gives."""
    values = thresholds.flatten().unique()
    grid = values.quantile(torch.linspace(0, 1, min(len(values), 2001)).to(values.dtype)) if len(values) > 2001 else values
    grid = torch.cat([grid - 1e-6, grid.new_tensor([values.max().item()])])  # just below each breakpoint
    depth = predicted_mean_exit(thresholds, grid, min_exit_layer, num_layers)
    levels = torch.linspace(float(depth.min()), float(depth.max()), count)
    chosen: dict[float, float] = {}
    for level in levels:
        index = int(torch.searchsorted(depth.contiguous(), level.reshape(1)).clamp(max=len(grid) - 1))
        chosen[round(float(grid[index]), 6)] = float(depth[index])
    return sorted(chosen.items())


# --- the search ---------------------------------------------------------------------------------


@dataclass
class Probe:
    tau: float
    predicted_mean_exit: float
    fidelity: Fidelity

    def to_dict(self) -> dict:
        return {"tau": self.tau, "predicted_mean_exit_layer": self.predicted_mean_exit, **self.fidelity.to_dict()}


@dataclass
class CalibrationResult:
    tau: float
    target: Target
    bits: int
    group_size: int
    measured: Fidelity  # at the chosen tau, on the calibration text
    probes: list[Probe] = field(default_factory=list)  # every real measurement, by tau
    text: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    min_exit_layer: int = 1

    def profile_entry(self) -> dict:
        from riverllm import __version__

        return {
            "bits": self.bits, "group_size": self.group_size, "tau": self.tau, "min_exit_layer": self.min_exit_layer,
            "target": {"metric": self.target.metric, "value": self.target.value},
            "measured": self.measured.to_dict(), "text": self.text,
            "probes": [p.to_dict() for p in self.probes], "notes": self.notes,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "riverllm_version": __version__, "method": "similarity-proposed candidates, verified binary search",
        }


def calibrate(lm: RiverLM, target: Target, bits: int | None = None, segments: list[Segment] | None = None,
              text: dict | None = None, min_exit_layer: int = 1, candidates: int = CANDIDATES,
              progress: bool = False) -> CalibrationResult:
    """The lowest tau whose river meets `target` against dense on `segments` (default: the
    held-out Brown windows)."""
    from tqdm.auto import tqdm

    bits = bits or lm.quant.bits
    if segments is None:
        segments, text = calibration_segments(lm, progress=progress)
    lm.river(bits)  # build (or load) it before anything is timed or shown as progress
    references = References(lm)
    thresholds = []
    for segment in tqdm(segments, desc="dense pass", unit="window", disable=not progress, leave=False):
        similarities, reference = dense_pass(lm, segment)
        references.put(segment, reference)
        thresholds.append(exit_thresholds(similarities, segment.prompt_len, min_exit_layer))
    thresholds = torch.cat(thresholds)
    # A candidate predicted never to exit is "never exit", which needs no measuring (it is dense).
    proposals = [(tau, depth) for tau, depth in propose_taus(thresholds, min_exit_layer, lm.num_layers, candidates)
                 if depth < lm.num_layers]
    probes: dict[int, Probe] = {}
    total = sum(s.positions for s in segments)
    expected_probes = math.ceil(math.log2(len(proposals) + 1))

    def probe(index: int) -> Probe:
        tau, predicted = proposals[index]
        fidelity = measure(lm, segments, f"river{bits}", references, tau=tau, bits=bits,
                           min_exit_layer=min_exit_layer, progress=progress,
                           description=f"probe {len(probes) + 1}/{expected_probes}: tau {tau:.4f}",
                           give_up=lambda partial: target.certainly_missed(partial, total))
        probes[index] = Probe(tau, predicted, fidelity)
        return probes[index]

    # Invariant: every candidate at index <= low misses the target (low = -1: none measured),
    # every one at index >= high meets it (high = len(proposals): "never exit", which is dense).
    low, high = -1, len(proposals)
    while high - low > 1:
        middle = (low + high) // 2
        if target.met_by(probe(middle).fidelity):
            high = middle
        else:
            low = middle

    notes = []
    if high == len(proposals):
        tau = NEVER_EXIT_TAU
        measured = Fidelity(positions=total, agreeing=total, exit_layers=[lm.num_layers] * total,
                            num_layers=lm.num_layers, segments=[(s.positions, s.positions, 0.0) for s in segments])
        notes.append(f"no exit threshold meets {target.describe()}: the river is never used (tau {NEVER_EXIT_TAU})")
    else:
        tau, measured = proposals[high][0], probes[high].fidelity
    ordered = [probes[i] for i in sorted(probes)]
    complete = [p for p in ordered if p.fidelity.positions == total]  # early-stopped probes are partial
    values = [p.fidelity.agree if target.metric == "agree" else -p.fidelity.kl for p in complete]
    if any(later < earlier for earlier, later in zip(values, values[1:])):
        notes.append("fidelity was not monotone in tau across the probes: "
                     + ", ".join(f"tau {p.tau:.4f}: {target.metric} {getattr(p.fidelity, target.metric):.4f}"
                                 for p in complete))
    return CalibrationResult(tau, target, bits, lm.quant.group_size, measured, ordered, text or {}, notes,
                             min_exit_layer)


# --- the command ----------------------------------------------------------------------------------


def calibrate_and_save(lm: RiverLM, target: Target, text_file: Path | None = None, tokens: int = DEFAULT_TOKENS,
                       progress: bool = True) -> tuple[CalibrationResult, Path]:
    """`riverllm calibrate`: calibrate lm's river at lm.quant.bits and store the tau in its profile."""
    segments, text = calibration_segments(lm, text_file, tokens, progress=progress)
    result = calibrate(lm, target, lm.quant.bits, segments, text, progress=progress)
    path = write_profile_entry(lm.name, result.profile_entry())
    lm.profile_tau[result.bits] = result.tau
    return result, path


def summary_lines(result: CalibrationResult, path: Path) -> list[str]:
    measured = result.measured
    if result.tau == NEVER_EXIT_TAU:
        verdict = f"none of the {len(result.probes)} measured thresholds meets {result.target.describe()}"
    else:
        verdict = f"the lowest of {len(result.probes)} measured thresholds that meets {result.target.describe()}"
    lines = [
        f"tau = {result.tau:.4f} for the {result.bits}-bit river (group size {result.group_size}): {verdict}",
        f"on {measured.positions} held-out positions in {len(measured.segments)} texts: "
        f"agree {measured.agree:.3f} (+-{measured.standard_error('agree'):.3f}), "
        f"kl {measured.kl:.4f} (+-{measured.standard_error('kl'):.4f}), +- one standard error over texts; "
        f"expected mean exit layer {measured.mean_exit_layer:.2f} of {measured.num_layers}, "
        f"{100 * measured.full_precision_share:.0f}% of layers at full precision",
    ]
    for probe in result.probes:
        partial = "" if probe.fidelity.positions == measured.positions else \
            f" (stopped after {probe.fidelity.positions} positions: target out of reach)"
        lines.append(f"  probe tau {probe.tau:.4f}: agree {probe.fidelity.agree:.3f}, kl {probe.fidelity.kl:.4f}, "
                     f"mean exit layer {probe.fidelity.mean_exit_layer:.2f}{partial}")
    lines += [f"note: {note}" for note in result.notes]
    lines.append(f"profile written to {path}; generate, eval and serve now use tau {result.tau:.4f} "
                 f"for this model at {result.bits} bits unless --tau is given")
    return lines


# --- the speed target: lossless decoding's tau and draft length -------------------------------------

SPEED_TAUS = (0.85, 0.9, 0.94)  # the drafts' exit threshold (higher: deeper drafts, more accepted)
SPEED_DRAFTS = (2, 3, 4)  # drafts per backbone pass at most
SPEED_PROMPTS = 4
SPEED_NEW_TOKENS = 48


@dataclass
class SpeedResult:
    """The (tau, draft tokens) whose lossless decoding was measured fastest on held-out text."""

    bits: int
    group_size: int
    tau: float
    draft_tokens: int
    tokens_per_s: float
    dense_tokens_per_s: float
    grid: list[dict]  # every measured setting: tau, draft_tokens, tokens_per_s, acceptance_rate
    text: dict
    threads: int

    def profile_entry(self) -> dict:
        from riverllm import __version__

        return {"kind": "lossless", "bits": self.bits, "group_size": self.group_size, "tau": self.tau,
                "draft_tokens": self.draft_tokens, "tokens_per_s": self.tokens_per_s,
                "dense_tokens_per_s": self.dense_tokens_per_s, "threads": self.threads, "grid": self.grid,
                "text": self.text, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "riverllm_version": __version__, "method": "measured lossless tokens/s over a grid of tau and drafts"}


def calibrate_speed(lm: RiverLM, bits: int | None = None, prompts: list[str] | None = None, text: dict | None = None,
                    taus: tuple[float, ...] | None = None, drafts: tuple[int, ...] | None = None,
                    new_tokens: int | None = None, progress: bool = False) -> SpeedResult:
    """Time lossless decoding (greedy, `new_tokens` per prompt, EOS ignored) at every tau x drafts
    setting, and dense once, on `prompts` (default: held-out Brown text); the fastest wins.

    Speed is what is measured, not predicted: the best draft length depends on the hardware (on
    a CPU, verifying 4 or more tokens costs a step and a half; on a GPU almost nothing) as much
    as on the acceptance rate. All settings run in one sitting, interleaved prompt by prompt."""
    import time

    from tqdm.auto import tqdm

    bits = bits or lm.quant.bits
    taus, drafts, new_tokens = taus or SPEED_TAUS, drafts or SPEED_DRAFTS, new_tokens or SPEED_NEW_TOKENS
    if prompts is None:
        segments, text = calibration_segments(lm, tokens=SPEED_PROMPTS * DEFAULT_WINDOW, progress=progress)
        prompts = [lm.tokenizer.decode(s.ids[: s.prompt_len]) for s in segments[:SPEED_PROMPTS]]
    settings = [("dense", None, None)] + [(f"lossless{'' if bits == 4 else bits}:{tau:g}", tau, k)
                                          for tau in taus for k in drafts]
    for name, _, k in settings:  # build the river and the draft head, warm the kernels (not timed)
        lm.generate(prompts[0], method=name, max_new_tokens=2, raw=True, draft_tokens=k)
    # Totals per setting: (method name, draft tokens), since one tau runs at several draft lengths.
    seconds = {(name, k): 0.0 for name, _, k in settings}
    tokens = {(name, k): 0 for name, _, k in settings}
    drafted, accepted = dict.fromkeys(seconds, 0), dict.fromkeys(seconds, 0)
    with tqdm(total=len(prompts) * len(settings), desc="speed grid", unit="run", disable=not progress) as bar:
        for prompt in prompts:
            for name, _, k in settings:
                start = time.perf_counter()
                result = lm.generate(prompt, method=name, max_new_tokens=new_tokens, raw=True, ignore_eos=True,
                                     draft_tokens=k)
                seconds[name, k] += time.perf_counter() - start
                tokens[name, k] += len(result.token_ids)
                stats = result.extra.get("drafting", {})
                drafted[name, k] += stats.get("drafted", 0)
                accepted[name, k] += stats.get("accepted", 0)
                bar.update()
    grid = [{"tau": tau, "draft_tokens": k, "tokens_per_s": tokens[name, k] / seconds[name, k],
             "acceptance_rate": accepted[name, k] / max(drafted[name, k], 1)} for name, tau, k in settings[1:]]
    best = max(grid, key=lambda g: g["tokens_per_s"])
    text = dict(text or {}, prompts=len(prompts), new_tokens=new_tokens)
    return SpeedResult(bits, lm.quant.group_size, best["tau"], best["draft_tokens"], best["tokens_per_s"],
                       tokens["dense", None] / seconds["dense", None], grid, text, torch.get_num_threads())


def calibrate_speed_and_save(lm: RiverLM, progress: bool = True) -> tuple[SpeedResult, Path]:
    """`riverllm calibrate --target speed`: store lossless decoding's fastest tau and draft length."""
    result = calibrate_speed(lm, lm.quant.bits, progress=progress)
    path = write_profile_entry(lm.name, result.profile_entry())
    lm.profile_lossless[result.bits] = (result.tau, result.draft_tokens)
    return result, path


def speed_summary_lines(result: SpeedResult, path: Path) -> list[str]:
    lines = [f"lossless decoding with the {result.bits}-bit river: tau {result.tau:g}, up to {result.draft_tokens} "
             f"drafts per backbone pass: {result.tokens_per_s:.2f} tok/s vs dense {result.dense_tokens_per_s:.2f} "
             f"({result.tokens_per_s / result.dense_tokens_per_s:.2f}x), {result.threads} thread(s), same sitting"]
    for g in sorted(result.grid, key=lambda g: -g["tokens_per_s"]):
        lines.append(f"  tau {g['tau']:g}, {g['draft_tokens']} drafts: {g['tokens_per_s']:.2f} tok/s, "
                     f"{100 * g['acceptance_rate']:.0f}% of drafts accepted")
    lines.append(f"profile written to {path}; `--method lossless` now uses these unless --tau / --draft-tokens "
                 "are given")
    return lines
