"""Masked training: zero gradients for masked ranks, batch == one by one, checkpointing, ortho layers."""

import pytest
import torch
from conftest import add_lora, reference_rank, unet_inputs
from peft import set_peft_model_state_dict

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from tlora_diffusers.ortho import ortho_delta
from tlora_diffusers.tiny import tiny_pipeline
from tlora_diffusers.training import (
    add_ortho_tlora,
    export_ortho_peft,
    orthogonality_penalty,
    remove_ortho_tlora,
    resolve_targets,
)

CONV_AND_ATTN = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "conv1", "conv2"]




def sample(x, i):
    return {k: (sample(v, i) if isinstance(v, dict) else v[i:i + 1]) for k, v in x.items()}


def lora_grads(unet):
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def make_unet(variant):
    unet = tiny_pipeline("sdxl").unet
    if variant == "vanilla":
        add_lora(unet, "sdxl", rank=8, std=0.05)
        for n, p in unet.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        unet.requires_grad_(False)
        add_ortho_tlora(unet, resolve_targets(unet, CONV_AND_ATTN), 8, sig_type="last", init="random",
                        generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # move away from init so the delta is non-zero
            for n, p in unet.named_parameters():
                if n.endswith((".q", ".p", ".lam")):
                    p.add_(torch.randn_like(p) * 0.05)
    unet.train()
    return unet


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
def test_masked_ranks_get_exactly_zero_gradient(variant):
    unet = make_unet(variant)
    t = 800.0
    r = reference_rank(t, 8, 1, 1.0)
    with TLoRAPatch(unet, TLoRAConfig(8, 1)):
        unet(timestep=torch.tensor([t]), **unet_inputs(unet, 1)).sample.square().mean().backward()
    grads = lora_grads(unet)
    assert grads
    for name, g in grads.items():
        if name.endswith("lora_A.default.weight"):
            assert g[r:].abs().max() == 0 and g[:r].abs().max() > 0
        elif name.endswith("lora_B.default.weight"):
            assert g[:, r:].abs().max() == 0 and g[:, :r].abs().max() > 0
        elif name.endswith(".q"):
            assert g[r:].abs().max() == 0 and g[:r].abs().max() > 0
        elif name.endswith(".p"):
            assert g[:, r:].abs().max() == 0 and g[:, :r].abs().max() > 0
        elif name.endswith(".lam"):
            assert g[r:].abs().max() == 0 and g[:r].abs().max() > 0


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_batch_gradients_equal_sum_of_single_samples(variant, checkpointing):
    unet = make_unet(variant)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    x = unet_inputs(unet, 3)
    t = torch.tensor([50.0, 500.0, 950.0])
    with TLoRAPatch(unet, TLoRAConfig(8, 1, 1.0)):
        unet(timestep=t, **x).sample.square().sum().backward()
        batched = lora_grads(unet)
        unet.zero_grad()
        for i in range(3):  # gradient accumulation, one sample per step
            unet(timestep=t[i:i + 1], **sample(x, i)).sample.square().sum().backward()
        accumulated = lora_grads(unet)
    for name in batched:  # float32 reassociation only; a wrong per-sample mask is off by O(1)
        assert ((batched[name] - accumulated[name]).norm() / accumulated[name].norm()) < 1e-4, name


def test_checkpointing_recompute_sees_the_same_mask():
    plain, ckpt = make_unet("vanilla"), make_unet("vanilla")
    ckpt.enable_gradient_checkpointing()
    x = unet_inputs(plain, 2)
    t = torch.tensor([100.0, 900.0])
    grads = []
    for unet in (plain, ckpt):
        with TLoRAPatch(unet, TLoRAConfig(8, 1)):
            unet(timestep=t, **x).sample.square().sum().backward()
        grads.append(lora_grads(unet))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)
    # removing the patch restores diffusers' own checkpointing function
    assert all(type(m.__dict__.get("_gradient_checkpointing_func")).__name__ != "_MaskedCheckpointing"
               for m in ckpt.modules())


def test_ortho_zero_at_init_and_regulariser_zero():
    unet = tiny_pipeline("sdxl").unet
    x = unet_inputs(unet, 1)
    with torch.no_grad():
        before = unet(timestep=300, **x).sample
    paths = resolve_targets(unet, CONV_AND_ATTN)
    assert any("conv" in p for p in paths)  # 3x3 convs included
    add_ortho_tlora(unet, paths, 8, sig_type="middle", init="weight")
    with torch.no_grad():
        assert torch.equal(unet(timestep=300, **x).sample, before)
    assert orthogonality_penalty(unet).item() < 1e-8
    remove_ortho_tlora(unet)
    assert not any(type(m).__name__ == "OrthoTLoRALayer" for m in unet.modules())


@pytest.mark.parametrize("t", [0.0, 250.0, 600.0, 999.0])
@torch.no_grad()
def test_ortho_paired_export_reproduces_training_outputs(t):
    unet = make_unet("ortho").eval()
    x = unet_inputs(unet, 1)
    cfg = TLoRAConfig(8, 1, 1.0)
    with TLoRAPatch(unet, cfg):
        trained = unet(timestep=t, **x).sample
    state_dict, lora_config = export_ortho_peft(unet)
    remove_ortho_tlora(unet)
    fresh = tiny_pipeline("sdxl").unet
    from peft import LoraConfig

    fresh.add_adapter(LoraConfig(**lora_config))
    set_peft_model_state_dict(fresh, state_dict)
    with TLoRAPatch(fresh, TLoRAConfig(8, 1, 1.0, layout="paired")):
        exported = fresh(timestep=t, **x).sample
    torch.testing.assert_close(exported, trained, rtol=1e-4, atol=1e-5)


def test_paired_encoding_bf16_error_scales_with_delta():
    g = torch.Generator().manual_seed(0)
    from tlora_diffusers.ortho import paired_lora_factors, random_basis

    p0, lam0, q0 = random_basis(256, 192, 16, "last", generator=g)
    for eps in (1e-3, 1e-2):
        p = p0 + eps * torch.randn(p0.shape, generator=g) * p0.abs().mean()
        q = q0 + eps * torch.randn(q0.shape, generator=g) * q0.abs().mean()
        lam = lam0 * (1 + eps * torch.randn(lam0.shape, generator=g))
        ref = ortho_delta(p, lam, q, p0, lam0, q0)
        a, b = paired_lora_factors(p, lam, q, p0, lam0, q0)
        ours = (b.bfloat16().double() @ a.bfloat16().double() - ref).norm() / ref.norm()
        naive_a = torch.cat([lam[:, None] * q, lam0[:, None] * q0]).bfloat16().double()
        naive_b = torch.cat([p, -p0], 1).bfloat16().double()
        naive = (naive_b @ naive_a - ref).norm() / ref.norm()
        assert ours < 0.01, ours  # bf16 rounding of factors that scale with the delta
        assert naive > 10 * ours, (naive, ours)  # the naive stacked encoding is dominated by rounding
        if eps == 1e-3:
            assert naive > 1.0  # ... its error exceeds the delta itself (FACTS.md: 2-3x)


def test_errors_rank_too_large_and_no_targets():
    unet = tiny_pipeline("sdxl").unet
    with pytest.raises(ValueError, match=r"rank 4096 is larger than targeted layer .* allows"):
        add_ortho_tlora(unet, resolve_targets(unet, ["to_q"]), 4096)
    with pytest.raises(ValueError, match="match no Linear or Conv2d layer"):
        resolve_targets(unet, ["nonexistent_proj"])
    with pytest.raises(ValueError, match="sig_type must be one of"):
        add_ortho_tlora(unet, resolve_targets(unet, ["to_q"]), 4, sig_type="top")
