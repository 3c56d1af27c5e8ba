"""Our self-describing file: stock load_lora_weights loads it, TLoRAPatch(pipe) reads its config."""

import json
import os

import pytest
import torch
from conftest import LORA_TARGETS, add_lora, state_hash
from peft import get_peft_model_state_dict

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from tlora_diffusers.io import TLoRAFileMetadata, load_tlora, read_tlora_metadata, save_tlora
from tlora_diffusers.tiny import tiny_pipeline, tiny_prompt_embeds


def denoiser_of(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def save_from(pipe, kind, path, cfg, rank=8, alpha=None):
    den = denoiser_of(pipe)
    add_lora(den, kind, rank=rank, alpha=alpha)
    component = "unet" if hasattr(pipe, "unet") else "transformer"
    meta = TLoRAFileMetadata(cfg, base_model=type(den).__name__, component=component, target_modules=LORA_TARGETS[kind])
    return save_tlora(path, get_peft_model_state_dict(den), meta, den.peft_config["default"].to_dict())


def run(pipe, seed=0):
    return pipe(**tiny_prompt_embeds(pipe), num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("kind", ["sdxl", "flux", "flux2-klein"])
@torch.no_grad()
def test_stock_load_lora_weights_then_patch_without_config(kind, tmp_path):
    cfg = TLoRAConfig(8, 2, 1.5)
    trained = tiny_pipeline(kind)
    path = save_from(trained, kind, tmp_path, cfg, alpha=4)  # lora_alpha != r must survive
    assert path.name == "pytorch_lora_weights.safetensors"
    assert read_tlora_metadata(path).config == cfg
    with TLoRAPatch(trained, cfg):
        expected = run(trained)

    pipe = tiny_pipeline(kind)
    pipe.load_lora_weights(tmp_path)  # stock diffusers, nothing of ours
    den = denoiser_of(pipe)
    assert den.peft_config["default_0"].lora_alpha == 4
    with TLoRAPatch(pipe) as patch:
        assert patch.config == cfg
        got = run(pipe)
    assert abs(got - expected).max() < 1e-5
    with pytest.raises(ValueError, match="contradicts the T-LoRA config"):
        TLoRAPatch(pipe, TLoRAConfig(8, 1, 1.5))


@torch.no_grad()
def test_load_tlora_our_format_and_plain_lora_with_cfg(tmp_path):
    cfg = TLoRAConfig(8, 1, 1.0)
    src = tiny_pipeline("sdxl")
    save_from(src, "sdxl", tmp_path / "ours", cfg)
    pipe = tiny_pipeline("sdxl")
    info = load_tlora(pipe, tmp_path / "ours")
    assert (info.format, info.config, info.adapter_name) == ("tlora_diffusers", cfg, "tlora")
    with TLoRAPatch(pipe) as patch:
        assert patch.adapter_names == ["tlora"]

    # A plain diffusers LoRA file (no T-LoRA metadata) needs the schedule from the caller.
    src.save_lora_weights(tmp_path / "plain", unet_lora_layers=get_peft_model_state_dict(src.unet))
    with pytest.raises(ValueError, match="plain LoRA file with no T-LoRA config.*max_rank=8"):
        load_tlora(tiny_pipeline("sdxl"), tmp_path / "plain")
    info = load_tlora(tiny_pipeline("sdxl"), tmp_path / "plain", cfg)
    assert info.format == "diffusers" and info.config == cfg


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    cfg = TLoRAConfig(8)
    path = save_from(tiny_pipeline("sdxl"), "sdxl", tmp_path, cfg)
    before = path.read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_from(tiny_pipeline("sdxl"), "sdxl", tmp_path, TLoRAConfig(8, 3))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]


def _write_bad(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d, good: _write_bad(d, "random.safetensors", os.urandom(256)), "not a readable safetensors file"),
        (lambda d, good: _write_bad(d, "trunc.safetensors", good.read_bytes()[:-100]), "safetensors"),
        (lambda d, good: _write_bad(d, "empty.safetensors", b""), "not a readable safetensors file"),
        (lambda d, good: _write_bad(d, "x.pt", b"\x80\x04garbage"), "cannot be read as a weights-only torch file"),
        (lambda d, good: d / "missing.safetensors", "no such file"),
    ],
)
def test_bad_files_clear_error_and_pipeline_unchanged(tmp_path, make, fragment):
    good = save_from(tiny_pipeline("sdxl"), "sdxl", tmp_path / "good", TLoRAConfig(8))
    bad = make(tmp_path, good)
    pipe = tiny_pipeline("sdxl")
    before = state_hash(pipe.unet)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        load_tlora(pipe, bad)
    assert fragment in str(e.value) and str(bad.name) in str(e.value)
    assert state_hash(pipe.unet) == before and not getattr(pipe.unet, "peft_config", None)


def test_bad_metadata_and_wrong_base_model(tmp_path):
    from safetensors.torch import load_file, save_file

    good = save_from(tiny_pipeline("sdxl"), "sdxl", tmp_path / "good", TLoRAConfig(8))
    tensors = load_file(good)
    cases = {
        "notjson": "{nope",
        "list": "[1, 2]",
        "version": json.dumps({"format_version": 7, "max_rank": 8}),
        "badrank": json.dumps({"format_version": 1, "max_rank": "8"}),
        "shape": json.dumps({"format_version": 1, "max_rank": 4, "component": "unet"}),
        "targets": json.dumps({"format_version": 1, "max_rank": 8, "target_modules": "to_q"}),
    }
    messages = {"notjson": "not valid JSON", "list": "must be a JSON object", "version": r"format_version must be one of \(1, 2\), got 7",
                "badrank": "max_rank must be an int", "shape": "tensors have rank 8",
                "targets": "target_modules must be a list of strings"}
    for name, raw in cases.items():
        p = tmp_path / f"{name}.safetensors"
        save_file(tensors, p, metadata={"format": "pt", "tlora_config": raw})
        with pytest.raises(ValueError, match=messages[name]):
            load_tlora(tiny_pipeline("sdxl"), p)
    # A file for another base model: its modules do not exist in this denoiser.
    flux_file = save_from(tiny_pipeline("flux"), "flux", tmp_path / "flux", TLoRAConfig(8))
    pipe = tiny_pipeline("flux2")
    before = state_hash(pipe.transformer)
    with pytest.raises(ValueError, match=r"do not exist in Flux2Transformer2DModel|do not fit Flux2Transformer2DModel"):
        load_tlora(pipe, flux_file)
    assert state_hash(pipe.transformer) == before
    with pytest.raises(ValueError, match="do not fit|do not exist"):
        load_tlora(tiny_pipeline("sd3"), flux_file)


def test_a_dora_file_is_refused_not_loaded_without_its_magnitudes(tmp_path):
    """diffusers drops tensors it does not expect with a log line; the adapter would not be the file's."""
    from peft import LoraConfig

    src = tiny_pipeline("sdxl")
    src.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k"], use_dora=True))
    src.save_lora_weights(tmp_path / "dora", unet_lora_layers=get_peft_model_state_dict(src.unet))
    pipe = tiny_pipeline("sdxl")
    before = state_hash(pipe.unet)
    with pytest.raises(ValueError, match=r"not LoRA A/B weights, e\.g\. .*lora_magnitude_vector"):
        load_tlora(pipe, tmp_path / "dora", TLoRAConfig(8))
    assert state_hash(pipe.unet) == before and not getattr(pipe.unet, "peft_config", None)
