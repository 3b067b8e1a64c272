"""The backbone cache (model_cache.py): a hit gives the very model a conversion gives; a damaged,
outdated or foreign entry is detected, removed and rebuilt; writes are atomic; `riverllm models`
shows the cache and `riverllm cache clear` empties it."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from riverllm import model_cache
from riverllm.files import write_dir_atomic
from riverllm.loading import PACKAGED_MODELS, ensure_packaged, load_model
from riverllm.model_cache import MANIFEST, BackboneKey, backbone_key, entry_problem, open_entry, store_entry

SMOL = "smollm2-135m"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty riverllm cache that already holds the installed SmolLM2 GGUF (linked, not copied)."""
    installed = ensure_packaged(SMOL, progress=False).parent
    (tmp_path / SMOL).symlink_to(installed, target_is_directory=True)
    monkeypatch.setenv("RIVERLLM_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def tiny_entry(cache, smollm2_hf) -> tuple[BackboneKey, torch.nn.Module]:
    """A cached entry holding a tiny random Llama (fast to write and check), keyed like SmolLM2's."""
    _, tokenizer = smollm2_hf
    model = tiny_model("llama", vocab_size=len(tokenizer))
    key = backbone_key(ensure_packaged(SMOL, progress=False), torch.float32, SMOL, PACKAGED_MODELS[SMOL].sha256)
    assert store_entry(key, model, tokenizer, "f" * 24, progress=False) == key.entry_dir
    return key, model


def logits_of(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_a_damaged_entry_is_rebuilt_and_the_rebuilt_one_gives_the_converted_model(tiny_entry, capfd):
    """One GGUF conversion (the slow part) serves both checks: the rebuild after damage, and a
    cache hit that gives exactly the model the conversion gave."""
    key, tiny = tiny_entry
    weights = key.entry_dir / "model.safetensors"
    with weights.open("r+b") as handle:  # one byte in the middle of the tensor data
        handle.seek(weights.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    converted, tokenizer = load_model(SMOL, progress=False)  # detects the damage, converts the GGUF
    assert "does not match its checksum" in capfd.readouterr().err
    assert converted.config.num_hidden_layers == 30 != tiny.config.num_hidden_layers
    assert entry_problem(key.entry_dir, key) is None
    assert "quantization_config" not in json.loads((key.entry_dir / "config.json").read_text())

    loaded, cached_tokenizer = load_model(SMOL, progress=False)  # a hit
    assert "not usable" not in capfd.readouterr().err
    assert torch.equal(logits_of(converted, tokenizer), logits_of(loaded, cached_tokenizer))
    messages = [{"role": "user", "content": "What is 7 * 8?"}]
    assert (tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            == cached_tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert (cached_tokenizer.pad_token, cached_tokenizer.padding_side) == (tokenizer.pad_token, "left")
    assert loaded.generation_config.eos_token_id == converted.generation_config.eos_token_id


def truncate(entry: Path) -> None:
    with (entry / "model.safetensors").open("r+b") as handle:
        handle.truncate(1000)


def flip_a_byte(entry: Path) -> None:
    path = entry / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) - 7] ^= 1
    path.write_bytes(bytes(data))


def drop_the_manifest(entry: Path) -> None:
    (entry / MANIFEST).unlink()


def add_a_file(entry: Path) -> None:
    (entry / "stray.bin").write_bytes(b"x")


@pytest.mark.parametrize("damage, reason", [
    (truncate, "bytes, not"), (flip_a_byte, "checksum"), (drop_the_manifest, "manifest"), (add_a_file, "files"),
])
def test_damaged_entries_are_detected_and_removed(tiny_entry, damage, reason, capfd):
    key, _ = tiny_entry
    damage(key.entry_dir)
    assert reason in entry_problem(key.entry_dir, key)
    assert open_entry(key) is None and not key.entry_dir.exists()
    assert "rebuilding" in capfd.readouterr().err


@pytest.mark.parametrize("field, value", [
    ("source_checksum", "sha256:" + "0" * 64), ("riverllm_version", "0.0.1"), ("transformers_version", "4.0.0"),
    ("dtype", "bfloat16"), ("entry_format", 0),
])
def test_an_entry_made_from_another_source_or_version_is_not_used(tiny_entry, field, value):
    key, _ = tiny_entry
    other = dataclasses.replace(key, **{field: value})
    if field == "dtype":  # another dtype is another entry, not a stale one
        assert open_entry(other) is None and key.entry_dir.exists()
        return
    assert field in entry_problem(key.entry_dir, other)
    assert open_entry(other) is None and not key.entry_dir.exists()


def test_a_sound_entry_is_used(tiny_entry):
    key, model = tiny_entry
    assert open_entry(key) == key.entry_dir
    loaded, _ = load_model(SMOL, progress=False)  # the tiny model stands in for SmolLM2 here
    assert loaded.config.num_hidden_layers == model.config.num_hidden_layers
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_changed_gguf_at_the_same_path_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("RIVERLLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 100)
    before = backbone_key(path, torch.float32)
    path.write_bytes(b"GGUF" + b"\1" * 100)
    after = backbone_key(path, torch.float32)
    assert before.entry_dir == after.entry_dir and before.source_checksum != after.source_checksum


def test_a_failed_write_leaves_nothing_behind(cache, smollm2_hf, monkeypatch, capfd):
    _, tokenizer = smollm2_hf
    key = backbone_key(ensure_packaged(SMOL, progress=False), torch.float32, SMOL, PACKAGED_MODELS[SMOL].sha256)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", disk_full)  # after the weights were written
    assert store_entry(key, tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, "f" * 24,
                       progress=False) is None
    assert "could not cache" in capfd.readouterr().err
    assert list((cache / "backbones").iterdir()) == []


def test_write_dir_atomic_replaces_whole_folders(tmp_path):
    target = tmp_path / "entry"
    write_dir_atomic(target, lambda folder: (folder / "a").write_text("old"))
    with pytest.raises(KeyboardInterrupt):
        write_dir_atomic(target, lambda folder: ((folder / "b").write_text("half"), (_ for _ in ()).throw(KeyboardInterrupt)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"] and (target / "a").read_text() == "old"
    write_dir_atomic(target, lambda folder: (folder / "b").write_text("new"))
    assert [p.name for p in target.iterdir()] == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def cli(*args: str, cache: Path):
    """Run the command in-process (test_cli.py runs real subprocesses; these need no new imports)."""
    from typer.testing import CliRunner

    from riverllm.cli import app

    return CliRunner().invoke(app, list(args), env={"RIVERLLM_CACHE": str(cache), "COLUMNS": "200"})


def test_models_shows_the_cache_and_cache_clear_empties_it(tiny_entry, cache):
    key, _ = tiny_entry
    river = cache / "rivers" / f"{'f' * 24}-b4-g64.pt"
    river.parent.mkdir()
    river.write_bytes(b"\0" * 1000)
    rows = json.loads(cli("models", "--json", cache=cache).stdout)
    smol = next(row for row in rows if row["name"] == SMOL)
    [entry] = smol["cached"]
    assert entry["dtype"] == "float32" and entry["bytes"] > 0 and entry["rivers"] == [river.name]
    table = cli("models", cache=cache).stdout
    assert "float32" in table and "1 river(s)" in table

    proc = cli("cache", "clear", "no-such-model", cache=cache)
    assert proc.exit_code == 2 and proc.stderr.startswith("error: nothing is cached for 'no-such-model'")
    assert proc.exception is None or isinstance(proc.exception, SystemExit)
    assert key.entry_dir.exists()

    proc = cli("cache", "clear", SMOL, cache=cache)
    assert proc.exit_code == 0 and "removed 2" in proc.stdout, proc.output
    assert not key.entry_dir.exists() and not river.exists()
    assert (cache / SMOL).exists()  # the installed GGUF stays
    assert "nothing was cached" in cli("cache", "clear", cache=cache).stdout
