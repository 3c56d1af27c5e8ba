"""TLoRAPatch under diffusers' offloading (CPU forms), patched before or after enabling it."""

import numpy as np
import pytest
import torch
from conftest import add_lora

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from tlora_diffusers.tiny import tiny_pipeline

CPU = torch.device("cpu")


def offload(pipe, how):
    if how == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    elif how == "sequential_unet":
        # What enable_sequential_cpu_offload does to the UNet. The whole-pipeline call fails in stock
        # diffusers 0.42.1 / transformers 5.24 on CPU without our patch (CLIP buffers, meta device).
        from accelerate import cpu_offload

        cpu_offload(pipe.unet, execution_device=CPU)
    elif how == "group_block":
        pipe.unet.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type="block_level",
                                       num_blocks_per_group=1)
    elif how == "group_leaf":
        pipe.unet.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type="leaf_level")


def run(pipe):
    # Sequential offload needs real text encoders: diffusers' execution device is "meta" without them.
    return pipe(prompt="a photo of sks dog", num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def make():
    pipe = tiny_pipeline("sdxl", text_encoders=True)
    add_lora(pipe.unet, "sdxl")
    return pipe


@pytest.fixture(scope="module")
def reference():
    pipe = make()
    with torch.no_grad():
        plain = run(pipe)
        with TLoRAPatch(pipe, TLoRAConfig(8, 1)):
            masked = run(pipe)
    return plain, masked


@pytest.mark.parametrize("how", ["model", "sequential_unet", "group_block", "group_leaf"])
@pytest.mark.parametrize("order", ["patch_first", "offload_first"])
@torch.no_grad()
def test_offloading_keeps_masks(reference, how, order):
    plain, masked = reference
    pipe = make()
    if order == "offload_first":
        offload(pipe, how)
        patch = TLoRAPatch(pipe, TLoRAConfig(8, 1))
    else:
        patch = TLoRAPatch(pipe, TLoRAConfig(8, 1))
        offload(pipe, how)
    if how == "group_leaf":  # hooks on each lora_A move its weight during the call: never the pre-masked weights
        from tlora_diffusers.runtime.attachment import attachment_of

        assert not attachment_of(pipe.unet)._weights_allowed()
    got = run(pipe)
    np.testing.assert_allclose(got, masked, atol=1e-5)
    assert np.abs(got - plain).max() > 1e-3  # the mask really changed the images
    patch.remove()
    np.testing.assert_allclose(run(pipe), plain, atol=1e-5)


def _tlora_file(tmp_path):
    from peft import get_peft_model_state_dict

    from tlora_diffusers.io import TLoRAFileMetadata, save_tlora

    donor = make()
    return save_tlora(tmp_path / "t", get_peft_model_state_dict(donor.unet), TLoRAFileMetadata(TLoRAConfig(8, 1)),
                      donor.unet.peft_config["default"].to_dict()), donor


def _lycoris_file(tmp_path, pipe):
    """A LyCORIS tlora file for the tiny SDXL UNet (its base is rebuilt from the weights: the hard case)."""
    from test_io_lycoris import train_lycoris

    return train_lycoris("sdxl", tmp_path / "lyco.safetensors")[1]


@pytest.mark.parametrize("how", ["model", "sequential_unet", "group_block"])
@pytest.mark.parametrize("fmt", ["ours", "lycoris"])
@torch.no_grad()
def test_load_tlora_into_an_offloaded_pipeline(tmp_path, how, fmt):
    from tlora_diffusers import load_tlora

    pipe = tiny_pipeline("sdxl", text_encoders=True)
    path = _tlora_file(tmp_path)[0] if fmt == "ours" else _lycoris_file(tmp_path, pipe)
    ref = tiny_pipeline("sdxl", text_encoders=True)
    load_tlora(ref, path)
    with TLoRAPatch(ref):
        expected = run(ref)
    offload(pipe, how)
    info = load_tlora(pipe, path)  # diffusers' offloading is turned off for the load and back on after
    assert info.adapter_name == "tlora"
    assert hasattr(pipe.unet, "_diffusers_hook" if how.startswith("group") else "_hf_hook")  # offloaded again
    with TLoRAPatch(pipe):
        np.testing.assert_allclose(run(pipe), expected, atol=1e-5)
