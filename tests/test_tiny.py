"""Tests for the tiny offline pipelines every other test, demo and benchmark builds on."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from diffusers import DiffusionPipeline  # noqa: E402

from tlora_diffusers.tiny import KINDS, save_tiny_pipeline, tiny_pipeline, tiny_prompt_embeds  # noqa: E402

PROMPT = "a photo of a sks dog"
DENOISER = {"sdxl": "unet", "flux": "transformer", "flux2-klein": "transformer", "flux2": "transformer",
            "sd3": "transformer", "sd": "unet"}


def _run(pipe: DiffusionPipeline, **kwargs) -> np.ndarray:
    """Four 64x64 steps with a fixed generator, as numpy images (B, H, W, C)."""
    return pipe(num_inference_steps=4, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def _state(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every tensor of every model component, keyed by component and parameter name."""
    return {f"{name}.{key}": value for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module) for key, value in module.state_dict().items()}


def _assert_same_weights(a: DiffusionPipeline, b: DiffusionPipeline) -> None:
    state_a, state_b = _state(a), _state(b)
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        assert torch.equal(value, state_b[key]), key


def _assert_same_outputs(reloaded: DiffusionPipeline, original: DiffusionPipeline, **kwargs) -> None:
    """Reloaded outputs match to float rounding as loaded, and bit for bit once realigned.

    ``from_pretrained`` memory-maps safetensors, so weights can sit at addresses that are
    not 64-byte aligned; CPU GEMM kernels then take other SIMD paths and round differently
    (about 1 ulp, seen on Flux and Flux2). Copying the weights to fresh memory removes that.
    """
    expected = _run(original, **kwargs)
    np.testing.assert_allclose(_run(reloaded, **kwargs), expected, rtol=0, atol=1e-5)
    for module in reloaded.components.values():
        if isinstance(module, torch.nn.Module):
            for sub in module.modules():
                for param in sub._parameters.values():
                    if param is not None:
                        param.data = param.data.clone()
                for name, buffer in sub._buffers.items():
                    if buffer is not None:
                        sub._buffers[name] = buffer.clone()
    np.testing.assert_array_equal(_run(reloaded, **kwargs), expected)


@pytest.fixture(scope="module", params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipe(kind: str) -> DiffusionPipeline:
    return tiny_pipeline(kind)


@pytest.fixture(scope="module")
def pipe_te(kind: str) -> DiffusionPipeline:
    return tiny_pipeline(kind, text_encoders=True)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_runs_from_embeddings(pipe: DiffusionPipeline, batch_size: int) -> None:
    images = _run(pipe, **tiny_prompt_embeds(pipe, batch_size))
    assert images.shape == (batch_size, 64, 64, 3)
    assert np.isfinite(images).all()


def test_components_are_in_eval_mode(pipe: DiffusionPipeline, pipe_te: DiffusionPipeline) -> None:
    for p in (pipe, pipe_te):
        for name, module in p.components.items():
            if isinstance(module, torch.nn.Module):
                assert not any(sub.training for sub in module.modules()), name


def test_text_encoders_absent_by_default(pipe: DiffusionPipeline) -> None:
    for name, value in pipe.components.items():
        if name.startswith(("text_encoder", "tokenizer")):
            assert value is None, name


def test_same_seed_gives_identical_weights(kind: str, pipe: DiffusionPipeline) -> None:
    _assert_same_weights(pipe, tiny_pipeline(kind, seed=0))
    other = getattr(tiny_pipeline(kind, seed=1), DENOISER[kind]).state_dict()
    mine = getattr(pipe, DENOISER[kind]).state_dict()
    assert any(not torch.equal(mine[key], other[key]) for key in mine)


def test_text_encoders_do_not_change_denoiser_or_vae(kind: str, pipe: DiffusionPipeline,
                                                       pipe_te: DiffusionPipeline) -> None:
    for name in (DENOISER[kind], "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(pipe_te, name).state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a), name


def test_build_leaves_global_rng_alone(kind: str) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny_pipeline(kind, seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_prompt_embeds_are_deterministic(pipe: DiffusionPipeline) -> None:
    a, b = tiny_prompt_embeds(pipe, seed=3), tiny_prompt_embeds(pipe, seed=3)
    c = tiny_prompt_embeds(pipe, seed=4)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["prompt_embeds"], c["prompt_embeds"])


def test_dtype(kind: str) -> None:
    pipe = tiny_pipeline(kind, dtype=torch.bfloat16)
    assert getattr(pipe, DENOISER[kind]).dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for v in tiny_prompt_embeds(pipe).values())


@pytest.mark.parametrize(
    ("kind", "modules"),
    [
        ("sdxl", ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                  "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                  "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
                  "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
                  "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.time_emb_proj"]),
        ("flux", ["transformer_blocks.1.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                  "transformer_blocks.0.ff.net.2", "single_transformer_blocks.1.attn.to_v",
                  "single_transformer_blocks.0.proj_out", "proj_out"]),
        ("flux2-klein", ["transformer_blocks.1.attn.to_q", "transformer_blocks.0.attn.to_out.0",
                         "single_transformer_blocks.1.attn.to_qkv_mlp_proj",
                         "single_transformer_blocks.0.attn.to_out"]),
        ("flux2", ["transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.attn.to_qkv_mlp_proj",
                   "time_guidance_embed.guidance_embedder.linear_1"]),
        ("sd3", ["transformer_blocks.1.attn.to_q", "transformer_blocks.0.attn.add_q_proj",
                 "transformer_blocks.0.ff.net.2"]),
    ],
)
def test_denoisers_keep_real_module_names(kind: str, modules: list[str]) -> None:
    denoiser = getattr(tiny_pipeline(kind), DENOISER[kind])
    names = dict(denoiser.named_modules())
    missing = [m for m in modules if m not in names]
    assert not missing


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("sdxl", [751, 501, 251, 1]), ("flux", None), ("flux2-klein", None), ("flux2", None), ("sd3", None),
     ("sd", [751, 501, 251, 1])],
)
def test_stock_schedulers(kind: str, expected: list[int] | None) -> None:
    scheduler = tiny_pipeline(kind).scheduler
    assert scheduler.config.num_train_timesteps == 1000
    if kind in ("sdxl", "sd"):
        scheduler.set_timesteps(4)
        assert scheduler.timesteps.tolist() == expected
    else:
        assert scheduler.config.use_dynamic_shifting == (kind != "sd3")


def test_save_and_reload_without_text_encoders(kind: str, pipe: DiffusionPipeline, tmp_path) -> None:
    path = save_tiny_pipeline(kind, tmp_path / kind, text_encoders=False)
    # Only SDXL marks its text encoders optional; the others need them passed as None.
    absent = {} if kind == "sdxl" else {name: None for name, value in pipe.components.items()
                                        if name.startswith(("text_encoder", "tokenizer")) and value is None}
    reloaded = DiffusionPipeline.from_pretrained(path, **absent)
    assert type(reloaded) is type(pipe)
    _assert_same_weights(pipe, reloaded)
    reloaded.set_progress_bar_config(disable=True)
    _assert_same_outputs(reloaded, pipe, **tiny_prompt_embeds(pipe))


def test_text_encoders_run_from_a_prompt(pipe_te: DiffusionPipeline) -> None:
    images = _run(pipe_te, prompt=PROMPT)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert not np.array_equal(images, _run(pipe_te, prompt="a watercolor of a red fox"))


def test_save_and_reload_with_text_encoders(kind: str, pipe_te: DiffusionPipeline, tmp_path) -> None:
    path = save_tiny_pipeline(kind, tmp_path / kind)  # text encoders are saved by default
    reloaded = DiffusionPipeline.from_pretrained(path)
    _assert_same_weights(pipe_te, reloaded)
    for name, value in pipe_te.components.items():
        if name.startswith("tokenizer") and value is not None:
            assert type(getattr(reloaded, name)) is type(value), name
            assert getattr(reloaded, name)(PROMPT).input_ids == value(PROMPT).input_ids, name
    reloaded.set_progress_bar_config(disable=True)
    _assert_same_outputs(reloaded, pipe_te, prompt=PROMPT)


def test_unknown_kind_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown tiny pipeline kind 'sd15'.*sdxl"):
        tiny_pipeline("sd15")


def test_prompt_embeds_for_unsupported_pipeline_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no tiny embeddings for object; supported: StableDiffusionXL"):
        tiny_prompt_embeds(object())
