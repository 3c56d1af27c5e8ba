"""No silent wrong output in the LoRA workflows diffusers users run: adapter states, several T-LoRAs,
hotswap, stale patches, and every error's advice taken (against an independent reference)."""

import warnings

import numpy as np
import pytest
import torch
from conftest import ReferenceMasks, add_lora, slot_mode, unet_inputs
from peft import LoraConfig, get_peft_model_state_dict

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from tlora_diffusers.io import TLoRAFileMetadata, save_tlora
from tlora_diffusers.tiny import tiny_pipeline, tiny_prompt_embeds


def run(pipe, steps=3, seed=0, **kw):
    return pipe(**tiny_prompt_embeds(pipe), num_inference_steps=steps, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kw).images


def reference(pipe, configs, **kw):
    """The unpatched pipeline with reference masks: adapter -> TLoRAConfig."""
    spec = {a: (c.max_rank, c.min_rank, c.alpha, 2 if c.layout == "paired" else 1) for a, c in configs.items()}
    ref = ReferenceMasks(pipe, spec)
    ref.record(lambda: run(pipe, **kw))
    with ref:
        return run(pipe, **kw)


def tlora_file(tmp_path, kind, cfg, name, seed, rank=None):
    """A T-LoRA file of ours (with its schedule in the metadata), made from a random LoRA."""
    donor = tiny_pipeline(kind)
    den = donor.unet if kind == "sdxl" else donor.transformer
    add_lora(den, kind, rank=rank or cfg.lora_rank, name="x", seed=seed)
    sd = get_peft_model_state_dict(den, adapter_name="x")
    lora_config = den.peft_config["x"].to_dict()
    component = "unet" if kind == "sdxl" else "transformer"
    return save_tlora(tmp_path / name, sd, TLoRAFileMetadata(cfg, component=component), lora_config)


A = TLoRAConfig(8, 1, 1.0)
B = TLoRAConfig(8, 5, 2.5)


@torch.no_grad()
@pytest.mark.parametrize("state", ["plain", "disable_lora", "scale_0", "scale_half", "set_adapters_weight",
                                   "two_adapters"])
def test_mask_path_in_every_adapter_state_equals_reference_and_fast_flag_changes_nothing(state):
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl", name="a")
    kw, configs = {}, {"a": A}
    if state == "disable_lora":
        pipe.disable_lora()
    elif state == "scale_0":
        kw = {"cross_attention_kwargs": {"scale": 0.0}}
    elif state == "scale_half":
        kw = {"cross_attention_kwargs": {"scale": 0.5}}
    elif state == "set_adapters_weight":
        pipe.set_adapters(["a"], [0.3])
    elif state == "two_adapters":
        add_lora(pipe.unet, "sdxl", name="b", seed=9)
        pipe.set_adapters(["a", "b"], [1.0, 0.7])
        configs = {"a": A, "b": B}
    expected = reference(pipe, configs, **kw)
    with TLoRAPatch(pipe, configs):
        masked = run(pipe, **kw)
    with pytest.warns(FutureWarning, match=r"fast=True\) is deprecated and ignored"):
        patch = TLoRAPatch(pipe, configs, fast=True)
    with patch:
        fast = run(pipe, **kw)
    np.testing.assert_array_equal(masked, expected)
    np.testing.assert_array_equal(fast, expected)
    if state in ("disable_lora", "scale_0"):  # the LoRA is off: the base model's image
        pipe.unet.unload_lora() if False else None
        base = tiny_pipeline("sdxl")
        np.testing.assert_allclose(masked, run(base, **kw), atol=1e-6)


@torch.no_grad()
def test_flux_joint_attention_scale_reaches_the_masked_lora():
    pipe = tiny_pipeline("flux")
    add_lora(pipe.transformer, "flux", name="a")
    for scale in (0.0, 0.4):
        kw = {"joint_attention_kwargs": {"scale": scale}}
        with TLoRAPatch(pipe, {"a": A}):
            got = run(pipe, **kw)
        np.testing.assert_array_equal(got, reference(pipe, {"a": A}, **kw))
    np.testing.assert_allclose(run(pipe, joint_attention_kwargs={"scale": 0.0}), run(tiny_pipeline("flux")), atol=1e-6)


@torch.no_grad()
def test_two_tloras_with_their_own_schedules_from_files_and_from_a_dict(tmp_path):
    pipe = tiny_pipeline("sdxl")
    pipe.load_lora_weights(str(tlora_file(tmp_path, "sdxl", A, "a", seed=1)), adapter_name="subject")
    pipe.load_lora_weights(str(tlora_file(tmp_path, "sdxl", B, "b", seed=2)), adapter_name="style")
    pipe.set_adapters(["subject", "style"], [1.0, 1.0])
    expected = reference(pipe, {"subject": A, "style": B})
    with TLoRAPatch(pipe) as patch:  # each adapter's schedule from its own file
        assert patch.configs == {"subject": A, "style": B}
        np.testing.assert_array_equal(run(pipe), expected)
    with TLoRAPatch(pipe, {"subject": A, "style": B}):
        np.testing.assert_array_equal(run(pipe), expected)
    with pytest.raises(AttributeError, match="different schedules; read .configs"):
        TLoRAPatch(pipe).config


@torch.no_grad()
def test_a_tlora_beside_an_ordinary_lora_error_names_it_and_its_advice_works(tmp_path):
    pipe = tiny_pipeline("sdxl")
    pipe.load_lora_weights(str(tlora_file(tmp_path, "sdxl", A, "a", seed=1)), adapter_name="subject")
    add_lora(pipe.unet, "sdxl", rank=4, name="style", seed=3)  # an ordinary (style) LoRA, no T-LoRA config
    pipe.set_adapters(["subject", "style"], [1.0, 0.8])
    with pytest.raises(ValueError, match=r"no T-LoRA config was found for adapter\(s\) \['style'\].*"
                                         r"TLoRAPatch\(pipe, adapter_names=\['subject'\]\)"):
        TLoRAPatch(pipe)
    with TLoRAPatch(pipe, adapter_names=["subject"]):  # the advice, taken: 'style' runs as an ordinary LoRA
        got = run(pipe)
    np.testing.assert_array_equal(got, reference(pipe, {"subject": A}))


@torch.no_grad()
def test_hotswap_through_the_pipeline_takes_the_new_files_schedule(tmp_path):
    pipe = tiny_pipeline("sdxl")
    pipe.load_lora_weights(str(tlora_file(tmp_path, "sdxl", A, "a", seed=1)), adapter_name="sks")
    patch = TLoRAPatch(pipe)
    assert patch.configs == {"sks": A}
    pipe.load_lora_weights(str(tlora_file(tmp_path, "sdxl", B, "b", seed=2)), adapter_name="sks", hotswap=True)
    got = run(pipe)
    assert patch.configs == {"sks": B}
    patch.remove()
    np.testing.assert_array_equal(got, reference(pipe, {"sks": B}))
    with TLoRAPatch(pipe) as fresh:  # the adapter's stored schedule was updated by the hotswap
        assert fresh.configs == {"sks": B}


@torch.no_grad()
def test_hotswap_without_a_patch_then_patching_is_refused_and_its_advice_works(tmp_path):
    pipe = tiny_pipeline("sdxl")
    pipe.load_lora_weights(str(tlora_file(tmp_path, "sdxl", A, "a", seed=1)), adapter_name="sks")
    pipe.load_lora_weights(str(tlora_file(tmp_path, "sdxl", B, "b", seed=2)), adapter_name="sks", hotswap=True)
    with pytest.raises(ValueError, match=r"adapter 'sks' of pipe.unet carries a T-LoRA config .* whose weights are no "
                                         r"longer loaded.*TLoRAPatch\(pipe, \{'sks': TLoRAConfig"):
        TLoRAPatch(pipe)
    with TLoRAPatch(pipe, {"sks": B}):  # the advice, taken
        got = run(pipe)
    np.testing.assert_array_equal(got, reference(pipe, {"sks": B}))


@torch.no_grad()
def test_hotswap_with_a_plain_lora_makes_the_next_call_fail(tmp_path):
    pipe = tiny_pipeline("sdxl")
    pipe.load_lora_weights(str(tlora_file(tmp_path, "sdxl", A, "a", seed=1)), adapter_name="sks")
    donor = tiny_pipeline("sdxl")
    add_lora(donor.unet, "sdxl", name="x", seed=5)
    plain = {f"unet.{k}": v for k, v in get_peft_model_state_dict(donor.unet, adapter_name="x").items()}
    patch = TLoRAPatch(pipe)
    pipe.load_lora_weights(plain, adapter_name="sks", hotswap=True)
    with pytest.raises(RuntimeError, match="hotswapped with a file that carries no T-LoRA config"):
        run(pipe)
    patch.remove()
    with TLoRAPatch(pipe, {"sks": B}):  # the advice, taken
        np.testing.assert_array_equal(run(pipe), reference(pipe, {"sks": B}))


@torch.no_grad()
def test_lora_hotswap_padding_is_masked(tmp_path):
    pipe = tiny_pipeline("sdxl")
    pipe.enable_lora_hotswap(target_rank=16)  # pads lora_A/lora_B of the next load to rank 16
    pipe.load_lora_weights(str(tlora_file(tmp_path, "sdxl", A, "a", seed=1)), adapter_name="sks")
    with TLoRAPatch(pipe) as patch:
        assert patch.configs == {"sks": A}
        got = run(pipe)
    np.testing.assert_array_equal(got, reference(pipe, {"sks": A}))


@torch.no_grad()
def test_bare_denoiser_patch_catches_a_newly_active_adapter():
    unet = tiny_pipeline("sdxl").unet
    add_lora(unet, "sdxl", name="a")
    add_lora(unet, "sdxl", name="b", seed=4)
    unet.set_adapters(["a"])
    patch = TLoRAPatch(unet, TLoRAConfig(8, 1))
    unet.set_adapters(["a", "b"])
    with pytest.raises(RuntimeError, match=r"adapter\(s\) \['b'\] became active after patching"):
        unet(timestep=10, **unet_inputs(unet))
    assert slot_mode(unet) is None
    patch.remove()
    with TLoRAPatch(unet, TLoRAConfig(8, 1)) as again:  # the advice ("patch again"), taken
        assert again.adapter_names == ["a", "b"]
        unet(timestep=10, **unet_inputs(unet))


@torch.no_grad()
def test_fused_after_patching_then_unfused_masks_again():
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl", name="a")
    expected = reference(pipe, {"a": A})
    patch = TLoRAPatch(pipe, {"a": A})
    pipe.fuse_lora(adapter_names=["a"])
    with pytest.raises(RuntimeError, match=r"unfuse_lora\(\) to mask it again"):
        run(pipe)
    pipe.unfuse_lora()  # the advice, taken (fuse + unfuse round the base weights: ~1e-4)
    np.testing.assert_allclose(run(pipe), expected, atol=2e-3)
    patch.remove()


def test_lora_bias_with_min_rank_zero_warns():
    pipe = tiny_pipeline("sdxl")
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q"], lora_bias=True), adapter_name="a")
    with pytest.warns(UserWarning, match="lora_bias=True: lora_B's bias is added at every step"):
        TLoRAPatch(pipe, TLoRAConfig(4, 0)).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TLoRAPatch(pipe, TLoRAConfig(4, 1)).remove()


@torch.no_grad()
def test_deep_copy_of_a_patched_denoiser_is_an_unpatched_one():
    import copy

    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl")
    x = unet_inputs(pipe.unet)
    unpatched = pipe.unet(timestep=900, **x).sample
    with TLoRAPatch(pipe, TLoRAConfig(8, 1)):
        twin = copy.deepcopy(pipe.unet)
        masked = pipe.unet(timestep=900, **x).sample
        assert torch.equal(twin(timestep=900, **x).sample, unpatched)
    assert not torch.equal(masked, unpatched)


@torch.no_grad()
def test_load_tlora_from_a_hub_repo_id_through_the_local_cache(tmp_path, monkeypatch):
    """As load_lora_weights takes them: "user/repo" + weight_name, resolved by huggingface_hub offline."""
    import shutil

    from tlora_diffusers import load_tlora

    src = tlora_file(tmp_path, "sdxl", A, "a", seed=1)
    cache = tmp_path / "hub"
    snapshot = cache / "models--me--sks-tlora" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(src, snapshot / "sks.safetensors")
    (cache / "models--me--sks-tlora" / "refs").mkdir()
    (cache / "models--me--sks-tlora" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = tiny_pipeline("sdxl")
    info = load_tlora(pipe, "me/sks-tlora", weight_name="sks.safetensors", cache_dir=str(cache))
    assert info.config == A and info.path.name == "sks.safetensors"
    with pytest.raises(FileNotFoundError, match=r"'missing.safetensors' of Hub repo 'me/sks-tlora' is not in the local "
                                                r"cache .*hf download me/sks-tlora missing.safetensors"):
        load_tlora(pipe, "me/sks-tlora", weight_name="missing.safetensors", cache_dir=str(cache))


@torch.no_grad()
def test_a_lora_on_a_torchao_int8_base_is_masked_like_the_reference():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_  # a test dependency; int8 runs on the CPU

    pipe = tiny_pipeline("sdxl")
    quantize_(pipe.unet, Int8WeightOnlyConfig())
    add_lora(pipe.unet, "sdxl", name="a")
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert type(layer).__name__ == "TorchaoLoraLinear"  # PEFT's layer for torchao bases
    expected = reference(pipe, {"a": A})
    with TLoRAPatch(pipe, {"a": A}):
        got = run(pipe)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.abs(got - run(pipe)).max() > 1e-3  # the mask changed the images


def test_bare_load_lora_adapter_without_metadata_error_names_use_safetensors_and_it_works(tmp_path):
    """diffusers' ``load_lora_adapter(file)`` without ``use_safetensors=True`` takes its non-safetensors path,
    which loads the tensors and drops the file's metadata (the schedule with it), like loading a state dict:
    the error must name the fix, and the fix must work."""
    folder = tlora_file(tmp_path, "sdxl", B, "a", seed=1)
    file = str(folder if folder.is_file() else folder / "pytorch_lora_weights.safetensors")
    unet = tiny_pipeline("sdxl").unet
    from safetensors.torch import load_file

    unet.load_lora_adapter(load_file(file), prefix="unet", adapter_name="lost")  # tensors only, as that path loads
    with pytest.raises(ValueError, match=r"\['lost'\].*use_safetensors=True"):
        TLoRAPatch(unet, num_train_timesteps=1000)
    unet.delete_adapters("lost")
    unet.load_lora_adapter(file, prefix="unet", adapter_name="kept", use_safetensors=True)
    with TLoRAPatch(unet, num_train_timesteps=1000) as patch:
        assert patch.configs == {"kept": B}
