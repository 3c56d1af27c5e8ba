"""The fast path: same images as the mask path, base weights restored bit for bit."""

import numpy as np
import pytest
import torch
from conftest import add_lora, state_hash

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from tlora_diffusers.tiny import tiny_pipeline, tiny_prompt_embeds


def denoiser_of(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def run(pipe, batch=1, steps=6, **kw):
    return pipe(**tiny_prompt_embeds(pipe, batch), num_inference_steps=steps, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.parametrize("kind", ["sdxl", "flux", "flux2-klein"])
@torch.no_grad()
def test_fast_path_matches_mask_path_fp32_and_restores_weights(kind):
    pipe = tiny_pipeline(kind)
    den = denoiser_of(pipe)
    add_lora(den, kind, std=0.1)
    cfg = TLoRAConfig(8, 1, 1.0)
    with TLoRAPatch(pipe, cfg):
        masked = run(pipe)
    before = state_hash(den)
    calls = []
    lora_a = next(m for n, m in den.named_modules() if n.endswith("lora_A.default"))
    spy = lora_a.register_forward_hook(lambda *a: calls.append(1))
    with TLoRAPatch(pipe, cfg, fast=True):
        fast = run(pipe)
    spy.remove()
    assert not calls  # the LoRA branch never ran: the ranks were merged
    assert state_hash(den) == before  # bit for bit
    assert np.abs(fast - masked).max() <= 2e-5
    with TLoRAPatch(pipe, TLoRAConfig(8, 8)):
        full = run(pipe)
    assert np.abs(fast - full).mean() > 100 * np.abs(fast - masked).mean()  # the schedule is in effect


@pytest.mark.parametrize("kind", ["sdxl", "flux", "flux2-klein"])
@torch.no_grad()
def test_fast_path_bf16_error_is_bf16_error(kind):
    """In bf16, merging rounds W + ΔW once more; the error against an fp32 reference must stay
    of the size the bf16 mask path itself has (what fusing a LoRA in bf16 costs, no more)."""
    pipe = tiny_pipeline(kind)
    den = denoiser_of(pipe)
    add_lora(den, kind, std=0.1)
    cfg = TLoRAConfig(8, 1, 1.0)
    with TLoRAPatch(pipe, cfg):
        reference = run(pipe)
    pipe.to(torch.bfloat16)
    before = state_hash(den)
    with TLoRAPatch(pipe, cfg):
        masked = run(pipe)
    with TLoRAPatch(pipe, cfg, fast=True):
        fast = run(pipe)
    assert state_hash(den) == before
    mask_err, fast_err = np.abs(masked - reference).mean(), np.abs(fast - reference).mean()
    assert fast_err <= 2 * mask_err + 1e-3, (fast_err, mask_err)


@torch.no_grad()
def test_fast_path_exception_restores_weights_and_next_run_is_correct():
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl", std=0.1)
    cfg = TLoRAConfig(8, 1)
    with TLoRAPatch(pipe, cfg):
        expected = run(pipe)
    before = state_hash(pipe.unet)
    with TLoRAPatch(pipe, cfg, fast=True):
        n = []

        def boom(m, a):
            n.append(1)
            if len(n) == 3:
                raise KeyboardInterrupt

        h = pipe.unet.mid_block.register_forward_pre_hook(boom)
        with pytest.raises(KeyboardInterrupt):
            run(pipe)
        h.remove()
        assert state_hash(pipe.unet) == before
        np.testing.assert_allclose(run(pipe), expected, atol=2e-5)
    assert state_hash(pipe.unet) == before


@torch.no_grad()
def test_fast_path_falls_back_for_per_sample_timesteps():
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl", std=0.1)
    x = torch.randn(2, 4, 8, 8)
    kw = tiny_prompt_embeds(pipe, 2)
    te = {"text_embeds": kw["pooled_prompt_embeds"], "time_ids": torch.randn(2, 6)}
    before = state_hash(pipe.unet)
    cfg = TLoRAConfig(8, 1)
    with TLoRAPatch(pipe.unet, cfg):
        expected = pipe.unet(x, torch.tensor([100.0, 900.0]), kw["prompt_embeds"], added_cond_kwargs=te).sample
    outs = []
    with TLoRAPatch(pipe, cfg, fast=True):
        # a pipeline run that calls the denoiser with per-sample timesteps once
        def callback(p, i, t, kwargs):
            if i == 0:
                outs.append(p.unet(x, torch.tensor([100.0, 900.0]), kw["prompt_embeds"], added_cond_kwargs=te).sample)
            return kwargs

        run(pipe, steps=2, callback_on_step_end=callback)
    torch.testing.assert_close(outs[0], expected, rtol=1e-5, atol=1e-5)
    assert state_hash(pipe.unet) == before


def test_fast_path_errors():
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl")
    with pytest.raises(ValueError, match="fast=True needs a pipeline"):
        TLoRAPatch(pipe.unet, TLoRAConfig(8), fast=True)
    add_lora(pipe.unet, "sdxl", name="style", seed=3)
    pipe.unet.set_adapters(["default", "style"])
    with pytest.raises(ValueError, match=r"fast=True cannot be used here: .*other active adapters \['style'\]"):
        TLoRAPatch(pipe, TLoRAConfig(8), adapter_names=["default"], fast=True)


@torch.no_grad()
def test_fast_path_two_masked_adapters_bf16():
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl", name="a", std=0.1)
    add_lora(pipe.unet, "sdxl", name="b", seed=5, std=0.1)
    pipe.unet.set_adapters(["a", "b"])
    cfg = TLoRAConfig(8, 1)
    with TLoRAPatch(pipe, cfg, adapter_names=["a", "b"]):
        reference = run(pipe)
    pipe.to(torch.bfloat16)
    with TLoRAPatch(pipe, cfg, adapter_names=["a", "b"]):
        masked = run(pipe)
    with TLoRAPatch(pipe, cfg, adapter_names=["a", "b"], fast=True):
        fast = run(pipe)
    pipe.unet.set_adapters(["b"])
    with TLoRAPatch(pipe, cfg, adapter_names=["b"]):
        only_b = run(pipe)
    mask_err, fast_err = np.abs(masked - reference).mean(), np.abs(fast - reference).mean()
    assert fast_err <= 2 * mask_err + 1e-3, (fast_err, mask_err)
    assert np.abs(fast - reference).mean() < np.abs(only_b - reference).mean()  # both adapters are merged


@torch.no_grad()
def test_fast_run_excludes_other_calls_of_the_denoiser():
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl", std=0.1)
    from conftest import unet_inputs

    x = unet_inputs(pipe.unet)
    before = state_hash(pipe.unet)
    errors = []

    def callback(p, i, t, kwargs):
        if i == 1:  # mid-run, from "another context": a direct call on the same denoiser
            import contextvars

            try:
                contextvars.Context().run(lambda: p.unet(timestep=900, **x))
            except RuntimeError as e:
                errors.append(str(e))
        return kwargs

    with TLoRAPatch(pipe, TLoRAConfig(8, 1), fast=True):
        run(pipe, steps=3, callback_on_step_end=callback)
    assert errors and "fast=True excludes concurrent use" in errors[0]
    assert state_hash(pipe.unet) == before
