"""Kohya-side T-LoRAs in, and files for kohya tools and ComfyUI-T-LoRA out.

The input files are built key by key as the tools write them:

* the sd-scripts T-LoRA fork, orangemagic123/sd-scripts@cb1be1cb40edb689625e0c42d4f983bc7e53d9af,
  ``networks/lora_tlora.py``: keys ``lora_unet_<module>`` with LDM/SGM block names for SDXL (lines 446-466), vanilla
  ``lora_down``/``lora_up``/``alpha`` (68-78), ortho ``q_layer``/``p_layer``/``lambda_layer``/``base_q``/``base_p``/
  ``base_lambda_buf``/``alpha`` (200-255), metadata ``ss_tlora_*`` (783-787) and ``ss_network_*``;
  forward ``org(x) + up(mask(down(x))) · alpha / r`` (107-140), ortho ``(P_r λ_r Q_r − Pb_r λb_r Qb_r) · alpha / r``
  (306-325), mask ``int(((T − t) / T) ** a · (R − m)) + m`` (577-579);
* Fizgig's T-LoRA, tachytelicdetonation/Fizgig@0cdfbed35859518edb42cc4404a5544c73a23118,
  ``src/fizgig/networks/lora.py`` (``TLoRAModule``, ``tlora_rank_mask``) and ``krea2/trainer.py``
  (``_save_exportable``): Krea 2 native names ``lora_unet_blocks_N_attn_wq`` ..., ``ss_adapter="tlora"``.

References are written here: diffusers' stock ``load_lora_weights`` for the names where it reads the file, else the
tool's forward on plain hooks; masks from the formula at the timesteps the loop passes to ``scheduler.step``.
"""

import math

import pytest
import torch
from conftest import ReferenceMasks, StepRecorder, reference_rank
from safetensors.torch import load_file, save_file
from test_families import CASES, output

from tlora_diffusers import TLoRAConfig, TLoRAPatch, convert_tlora, load_tlora, read_schedule
from tlora_diffusers.io import inspect_tlora

R, MIN, EXP = 4, 2, 1.5  # the files' schedule: max_rank (ss_network_dim), min_rank, exponent (alpha_rank_scale)
FORK_META = {"ss_network_module": "networks.lora_tlora", "ss_network_dim": str(R), "ss_network_alpha": "2.0",
             "ss_tlora_min_rank": str(MIN), "ss_tlora_alpha_rank_scale": str(EXP), "ss_tlora_max_timestep": "1000",
             "ss_tlora_sig_type": "last", "ss_base_model_version": "sdxl_base_v1-0"}


def sgm_name(path):
    """The tiny SDXL UNet's diffusers path -> the fork's kohya name (SGM blocks, layers_per_block = 1)."""
    for pattern, repl in ((r"down_blocks.1.attentions.0.", "input_blocks.3.1."), (r"mid_block.attentions.0.", "middle_block.1."),
                          (r"up_blocks.0.attentions.0.", "output_blocks.0.1."), (r"up_blocks.0.attentions.1.", "output_blocks.1.1.")):
        if path.startswith(pattern):
            return "lora_unet_" + (repl + path[len(pattern):]).replace(".", "_")
    raise AssertionError(path)


def unet_targets(unet):
    names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attentions." in n
             and not n.endswith(("time_emb_proj",))]
    assert names
    return names


def random_tensors(seed, pairs):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * 0.3 for shape in pairs]


def fork_vanilla_file(tmp_path, unet, alpha=2.0, meta=FORK_META, name="fork_vanilla.safetensors"):
    sd = {}
    modules = dict(unet.named_modules())
    for i, path in enumerate(unet_targets(unet)):
        m = modules[path]
        down, up = random_tensors(i, [(R, m.in_features), (m.out_features, R)])
        key = sgm_name(path)
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    file = tmp_path / name
    save_file(sd, str(file), metadata=meta)
    return file


def fork_ortho_file(tmp_path, unet, alpha=3.0):
    sd, parts = {}, {}
    modules = dict(unet.named_modules())
    for i, path in enumerate(unet_targets(unet)):
        m = modules[path]
        q, p, q0, p0 = random_tensors(i, [(R, m.in_features), (m.out_features, R), (R, m.in_features), (m.out_features, R)])
        lam, lam0 = torch.rand(1, R) + 0.5, torch.rand(1, R) + 0.5
        key = sgm_name(path)
        for k, v in (("q_layer.weight", q), ("p_layer.weight", p), ("lambda_layer", lam), ("base_q.weight", q0),
                     ("base_p.weight", p0), ("base_lambda_buf", lam0)):
            sd[f"{key}.{k}"] = v
        sd[f"{key}.alpha"] = torch.tensor(alpha)
        parts[path] = (q, p, lam, q0, p0, lam0, alpha / R)
    file = tmp_path / "fork_ortho.safetensors"
    save_file(sd, str(file), metadata={**FORK_META, "ss_tlora_init": "orthogonal"})
    return file, parts


def fork_rank(t, T=1000.0):
    """The fork's r(t) (networks/lora_tlora.py:577-579), written out."""
    return max(MIN, min(int(((T - t) / T) ** EXP * (R - MIN)) + MIN, R))


def recorded_timesteps(pipe, attrs, run):
    with StepRecorder(pipe, attrs) as rec:
        run()
    return rec.call_timesteps()


def hooked_reference(pipe, attr, deltas, run):
    """``run()`` on the unpatched pipeline with each target's delta added by a forward hook at the loop's r(t)."""
    times = recorded_timesteps(pipe, [attr], run)
    denoiser, state, handles = getattr(pipe, attr), {"i": -1}, []
    handles.append(denoiser.register_forward_pre_hook(lambda m, a: state.update(i=state["i"] + 1)))
    modules = dict(denoiser.named_modules())
    for path, delta in deltas.items():
        handles.append(modules[path].register_forward_hook(
            lambda m, args, out, delta=delta: out + delta(args[0], times[state["i"]]).to(out.dtype)))
    try:
        return run()
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def test_sd_scripts_fork_vanilla_sdxl_loads_from_its_metadata_and_masks_like_stock_diffusers_plus_the_formula(tmp_path):
    case = CASES["sdxl"]
    stock = case.build(0)
    file = fork_vanilla_file(tmp_path, stock.unet)
    assert read_schedule(file) == TLoRAConfig(R, MIN, EXP)
    stock.load_lora_weights(str(file), adapter_name="fork")  # diffusers' own kohya/SGM conversion: the names
    ref = ReferenceMasks(stock, {"fork": (R, MIN, EXP, 1)}, ["unet"])
    ref.record(lambda: stock(**case.inputs(stock, 0)))
    with ref:
        expected = output(stock(**case.inputs(stock, 0)))
    assert [r["fork"] for r in ref.ranks_seen] == [fork_rank(t) for t in ref.times]  # the fork's own r(t)
    with TLoRAPatch(stock, read_schedule(file)):  # the stock path: load_lora_weights + the file's schedule
        torch.testing.assert_close(output(stock(**case.inputs(stock, 0))), expected, rtol=0, atol=1e-5)
    pipe = case.build(0)
    info = load_tlora(pipe, file)  # one call: names and schedule from the file
    assert info.format == "kohya" and info.config == TLoRAConfig(R, MIN, EXP) and info.meta.source_format == "sd-scripts-tlora"
    with TLoRAPatch(pipe):
        torch.testing.assert_close(output(pipe(**case.inputs(pipe, 0))), expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_sd_scripts_fork_ortho_sdxl_is_exact_with_its_stored_base(tmp_path):
    case = CASES["sdxl"]
    pipe = case.build(0)
    file, parts = fork_ortho_file(tmp_path, pipe.unet)

    def delta(parts):
        q, p, lam, q0, p0, lam0, scale = parts

        def add(x, t):
            r = fork_rank(t)
            x = x.double()
            live = ((x @ q[:r].double().T) * lam[0, :r].double()) @ p[:, :r].double().T
            base = ((x @ q0[:r].double().T) * lam0[0, :r].double()) @ p0[:, :r].double().T
            return (live - base) * scale
        return add

    expected = hooked_reference(pipe, "unet", {k: delta(v) for k, v in parts.items()},
                                lambda: output(pipe(**case.inputs(pipe, 0))))
    info = load_tlora(pipe, file)
    assert info.config == TLoRAConfig(R, MIN, EXP, layout="paired") and info.meta.variant == "ortho"
    with TLoRAPatch(pipe):
        got = output(pipe(**case.inputs(pipe, 0)))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def fizgig_name(path):
    """Krea 2's diffusers path -> Fizgig's kohya name on the native module (inverse of diffusers' krea2 converter)."""
    attn = {"to_q": "wq", "to_k": "wk", "to_v": "wv", "to_out.0": "wo", "to_gate": "gate"}
    import re

    m = re.match(r"transformer_blocks\.(\d+)\.attn\.(.+)$", path)
    if m:
        return f"lora_unet_blocks_{m[1]}_attn_{attn[m[2]]}"
    m = re.match(r"transformer_blocks\.(\d+)\.ff\.(gate|up|down)$", path)
    if m:
        return f"lora_unet_blocks_{m[1]}_mlp_{m[2]}"
    raise AssertionError(path)


@torch.no_grad()
def test_fizgig_krea2_tlora_loads_from_its_metadata(tmp_path):
    case = CASES["krea2"]
    pipe = case.build(0)
    modules = dict(pipe.transformer.named_modules())
    targets = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks.")]
    sd, deltas, alpha = {}, {}, 8.0
    for i, path in enumerate(targets):
        m = modules[path]
        down, up = random_tensors(100 + i, [(R, m.in_features), (m.out_features, R)])
        key = fizgig_name(path)
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"] = down, up, torch.tensor(alpha)

        def add(x, t, down=down, up=up):  # Fizgig's TLoRAModule forward, the rank at the loop's exact t
            r = reference_rank(t, R, 1, 1.0)
            h = x.double() @ down.double().T
            h[..., r:] = 0
            return (h @ up.double().T) * alpha / R
        deltas[path] = add
    file = tmp_path / "krea2_tlora.safetensors"
    save_file(sd, str(file), metadata={"ss_network_module": "fizgig.krea2 (tlora, all-Linear)", "ss_adapter": "tlora",
                                       "ss_network_dim": str(R), "ss_network_alpha": str(alpha), "ss_architecture": "krea2",
                                       "ss_tlora_min_rank": "1", "ss_tlora_max_timestep": "1000",
                                       "ss_adapter_weights": "T-LoRA raw weights: inference must apply the timestep "
                                                             "rank mask; as a plain LoRA it runs at full rank"})
    expected = hooked_reference(pipe, "transformer", deltas, lambda: output(pipe(**case.inputs(pipe, 0))))
    info = load_tlora(pipe, file)
    assert info.config == TLoRAConfig(R, 1, 1.0) and info.meta.source_format == "fizgig"
    with TLoRAPatch(pipe):
        got = output(pipe(**case.inputs(pipe, 0)))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@torch.no_grad()
def test_a_kohya_file_without_tlora_metadata_is_an_ordinary_lora(tmp_path):
    case = CASES["sdxl"]
    pipe = case.build(0)
    file = fork_vanilla_file(tmp_path, pipe.unet, meta={"ss_network_module": "networks.lora"}, name="plain.safetensors")
    assert read_schedule(file) is None
    report = inspect_tlora(file, pipe)
    assert report["format"] == "kohya" and report["needs"] == ["cfg"] and report["config"] == "needs cfg"
    with pytest.raises(ValueError, match=r"plain.safetensors: a kohya LoRA whose metadata declares no T-LoRA schedule.*"
                                         r"an ordinary LoRA.*min_rank="):
        load_tlora(pipe, file)
    assert load_tlora(pipe, file, min_rank=MIN, alpha=EXP).config == TLoRAConfig(R, MIN, EXP)  # the advice, taken


@pytest.mark.parametrize("bad, message", [
    ("text", r"text-encoder LoRA layer\(s\) \(lora_te1_text_model.*pipe.load_lora_weights\(path\); "
             r"TLoRAPatch\(pipe, tlora_diffusers.read_schedule\(path\)\)"),
    ("unknown", r"bad.safetensors: 1 kohya module name\(s\) match no module of UNet2DConditionModel.*lora_unet_nowhere"),
    ("half", r"bad.safetensors: lora_unet_.* has \['alpha', 'lambda_layer', 'p_layer.weight', 'q_layer.weight'\]"),
    ("ranks", r"bad.safetensors: modules have different ranks \[3, 4\]"),
])
def test_bad_or_half_matching_kohya_files_name_the_file_and_the_keys(tmp_path, bad, message):
    case = CASES["sdxl"]
    pipe = case.build(0)
    sd = load_file(str(fork_vanilla_file(tmp_path, pipe.unet)))
    first = sorted(k for k in sd if k.endswith(".lora_down.weight"))[0].rpartition(".lora_down")[0]
    if bad == "text":
        sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(R, 8)
        sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(8, R)
    elif bad == "unknown":
        sd["lora_unet_nowhere.lora_down.weight"], sd["lora_unet_nowhere.lora_up.weight"] = torch.zeros(R, 8), torch.zeros(8, R)
    elif bad == "half":
        for k in ("lora_down.weight", "lora_up.weight"):
            del sd[f"{first}.{k}"]
        sd[f"{first}.q_layer.weight"], sd[f"{first}.p_layer.weight"] = torch.zeros(R, 8), torch.zeros(8, R)
        sd[f"{first}.lambda_layer"] = torch.ones(1, R)
    else:
        sd[f"{first}.lora_down.weight"] = sd[f"{first}.lora_down.weight"][:3].contiguous()
        sd[f"{first}.lora_up.weight"] = sd[f"{first}.lora_up.weight"][:, :3].contiguous()
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path), metadata=FORK_META)
    with pytest.raises(ValueError, match=message):
        load_tlora(pipe, path)
    assert not getattr(pipe.unet, "peft_config", None)  # nothing was loaded


def ours(tmp_path, case_name, cfg, targets, seed=0):
    """A T-LoRA file of ours on ``targets`` of a tiny case (random, non-zero)."""
    from peft import LoraConfig, get_peft_model_state_dict

    from tlora_diffusers.io import TLoRAFileMetadata, save_tlora

    case = CASES[case_name]
    donor = case.build(seed)
    attr = case.denoiser_attrs[0]
    den = getattr(donor, attr)
    torch.manual_seed(seed)
    den.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank / 2, target_modules=list(targets),
                               init_lora_weights=False))
    with torch.no_grad():
        for n, p in den.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    meta = TLoRAFileMetadata(cfg, variant="ortho" if cfg.layout == "paired" else "vanilla", component=attr)
    return save_tlora(tmp_path / f"{case_name}-ours", get_peft_model_state_dict(den), meta, den.peft_config["default"].to_dict())


def masked_output(case_name, file, seed=0):
    case = CASES[case_name]
    pipe = case.build(seed)
    load_tlora(pipe, file)
    with TLoRAPatch(pipe):
        return output(pipe(**case.inputs(pipe, 0)))


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.mark.parametrize("case_name, layout, to, targets", [
    ("sdxl", "plain", "kohya", ATTENTION + ("ff.net.0.proj", "ff.net.2")),
    ("sdxl", "paired", "kohya", ATTENTION + ("ff.net.0.proj",)),
    ("sdxl", "plain", "comfyui-tlora", ATTENTION),
    ("sdxl", "paired", "comfyui-tlora", ATTENTION),
    ("flux", "plain", "kohya", ATTENTION + ("add_q_proj", "proj_mlp")),
    ("flux", "plain", "comfyui-tlora", ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj")),
])
@torch.no_grad()
def test_round_trips_through_kohya_and_comfyui_tlora_give_the_same_masked_outputs(tmp_path, case_name, layout, to, targets):
    cfg = TLoRAConfig(4, 1, 2.0, layout=layout)
    src = ours(tmp_path, case_name, cfg, targets)
    exported = convert_tlora(src, tmp_path / f"x-{to}.safetensors", to=to)
    keys = list(load_file(str(exported)))
    if to == "kohya":
        assert all(k.startswith(("lora_unet_", "lora_transformer_")) for k in keys)
        assert any(k.endswith(".alpha") for k in keys) and read_schedule(exported) == cfg
    else:
        assert all(".processor.to_" in k and "_lora." in k for k in keys)
    back = convert_tlora(exported, tmp_path / f"back-{to}", denoiser=CASES[case_name].build(0))
    torch.testing.assert_close(masked_output(case_name, back), masked_output(case_name, src), rtol=0, atol=2e-5)


@torch.no_grad()
def test_sdxl_kohya_export_uses_the_sgm_names_sd_scripts_gives_its_sdxl_unet(tmp_path):
    """sd-scripts' SDXL UNet (``sdxl_original_unet``) names its modules input_blocks/middle_block/output_blocks, so
    an SDXL export in diffusers' names would match nothing there. With the base model's config the export writes
    SGM names; stock diffusers' own SGM mapping loads the file into the right modules (same masked outputs), and
    ``kohya_names="diffusers"`` keeps diffusers' names."""
    from tlora_diffusers.io.export import _sgm_path

    # Real SDXL (layers_per_block 2), names as sd-scripts writes them.
    assert _sgm_path("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2) == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert _sgm_path("down_blocks.2.attentions.1.proj_in", 2) == "input_blocks.8.1.proj_in"
    assert _sgm_path("mid_block.attentions.0.transformer_blocks.9.ff.net.2", 2) == \
        "middle_block.1.transformer_blocks.9.ff.net.2"
    assert _sgm_path("up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_out.0", 2) == \
        "output_blocks.2.1.transformer_blocks.0.attn2.to_out.0"
    with pytest.raises(ValueError, match="only attention modules have an SGM"):
        _sgm_path("down_blocks.0.resnets.0.conv1", 2)

    case = CASES["sdxl"]
    cfg = TLoRAConfig(4, 1, 2.0)
    src = ours(tmp_path, "sdxl", cfg, ATTENTION)
    sgm = convert_tlora(src, tmp_path / "sgm.safetensors", case.build(0), to="kohya")
    keys = [k for k in load_file(str(sgm)) if k.endswith(".lora_down.weight")]
    assert keys and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
                        for k in keys)
    pipe = case.build(0)
    pipe.load_lora_weights(str(sgm))  # stock diffusers maps SGM names with the UNet's config
    with TLoRAPatch(pipe, read_schedule(sgm)):
        got = output(pipe(**case.inputs(pipe, 0)))
    torch.testing.assert_close(got, masked_output("sdxl", src), rtol=0, atol=2e-5)
    plain = convert_tlora(src, tmp_path / "d.safetensors", case.build(0), to="kohya", kohya_names="diffusers")
    assert all("_down_blocks_" in k or "_mid_block_" in k or "_up_blocks_" in k for k in load_file(str(plain)))

    # Without the base model, SDXL is told by its attentions holding several transformer blocks (SD 1.x/2.x: one).
    from types import SimpleNamespace

    from tlora_diffusers.io.export import _is_sdxl

    def lora_on(*paths):
        sd = {f"{p}.lora_{x}.weight": torch.zeros(4, 4) for p in paths for x in "AB"}
        return SimpleNamespace(meta=SimpleNamespace(component="unet"), lora_config={"r": 4, "lora_alpha": 4},
                               state_dict=sd)

    block = "down_blocks.1.attentions.0.transformer_blocks.{}.attn1.to_q"
    assert _is_sdxl(lora_on(block.format(0), block.format(1)), None)
    assert not _is_sdxl(lora_on(block.format(0)), None)

    # A LoRA on modules without an SGM name here (resnets) is refused with advice, and the advice works.
    conv = ours(tmp_path / "conv", "sdxl", cfg, ATTENTION + ("conv1",))
    with pytest.raises(ValueError, match="export with kohya_names='diffusers'"):
        convert_tlora(conv, tmp_path / "c.safetensors", case.build(0), to="kohya")
    conv_kohya = convert_tlora(conv, tmp_path / "c.safetensors", case.build(0), to="kohya", kohya_names="diffusers")
    assert any("_resnets_" in k for k in load_file(str(conv_kohya)))


def test_kohya_export_metadata_carries_the_schedule_and_its_ss_tlora_mirror(tmp_path):
    from safetensors import safe_open

    src = ours(tmp_path, "sdxl", TLoRAConfig(4, 1, 2.0), ATTENTION)
    out = convert_tlora(src, tmp_path / "k.safetensors", to="kohya")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_tlora_min_rank"] == "1" and meta["ss_tlora_alpha_rank_scale"] == "2.0"
    assert meta["ss_network_dim"] == "4" and meta["ss_tlora_max_timestep"] == "1000" and meta["ss_adapter"] == "tlora"
    assert meta["ss_network_module"] == "networks.lora_tlora" and '"min_rank": 1' in meta["tlora_config"]


@torch.no_grad()
def test_static_export_is_the_unmasked_lora_for_any_loader(tmp_path):
    case = CASES["sdxl"]
    src = ours(tmp_path, "sdxl", TLoRAConfig(4, 1, 1.0), ATTENTION)
    static = convert_tlora(src, tmp_path / "static.safetensors", to="static")
    assert read_schedule(static) is None  # no schedule: no tool masks it by mistake
    a, b = case.build(0), case.build(0)
    a.load_lora_weights(str(src))
    b.load_lora_weights(str(static))  # stock diffusers, kohya keys
    torch.testing.assert_close(output(b(**case.inputs(b, 0))), output(a(**case.inputs(a, 0))), rtol=0, atol=1e-5)


@torch.no_grad()
def test_exports_scale_like_peft_and_refuse_what_they_cannot_hold(tmp_path):
    """rsLoRA (alpha / sqrt(r)) and a regex alpha_pattern fold into the static export as PEFT scales them: each
    written module's up @ down * alpha / r equals PEFT's own B @ A * scaling of the source model. (Stock diffusers
    0.42.1 loads a kohya SDXL file whose modules have different alphas with one alpha for all: its alpha_pattern
    keys never match, so this compares with PEFT's modules, not with a stock load.) A DoRA LoRA is refused by name,
    not written without its magnitudes."""
    from peft import LoraConfig, get_peft_model_state_dict

    from tlora_diffusers.io import TLoRAFileMetadata, save_tlora

    case = CASES["sdxl"]
    cfg = TLoRAConfig(4, 1, 1.0)
    for name, extra in (("rslora", dict(use_rslora=True, alpha_pattern={r"attn\d\.to_q": 1.0})),
                        ("dora", dict(use_dora=True))):
        donor = case.build(0).unet
        torch.manual_seed(0)
        donor.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(ATTENTION), init_lora_weights=False, **extra))
        for n, p in donor.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
        meta = TLoRAFileMetadata(cfg, variant="vanilla", component="unet")
        src = save_tlora(tmp_path / name, get_peft_model_state_dict(donor), meta, donor.peft_config["default"].to_dict())
        if name == "dora":
            with pytest.raises(ValueError, match="DoRA magnitudes and LoRA biases have no place"):
                convert_tlora(src, tmp_path / "dora-static.safetensors", to="static")
            continue
        written = load_file(str(convert_tlora(src, tmp_path / "static.safetensors", to="static")))
        scales = set()
        for path, m in donor.named_modules():
            if not hasattr(m, "lora_A") or "default" not in m.lora_A:
                continue
            key = "lora_unet_" + path.replace(".", "_")
            got = written[f"{key}.lora_up.weight"] @ written[f"{key}.lora_down.weight"] * written[f"{key}.alpha"] / 4
            expected = m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
            scales.add(m.scaling["default"])
        assert scales == {1.0 / 2, 8.0 / 2}  # alpha / sqrt(4): the pattern's 1 on to_q, 8 elsewhere


def test_comfyui_export_names_what_the_node_drops_and_the_settings_to_type(tmp_path):
    src = ours(tmp_path, "flux", TLoRAConfig(4, 2, 1.0), ATTENTION + ("proj_mlp",))
    with pytest.warns(UserWarning, match=r"masks attention projections only: \d+ target\(s\) left out.*proj_mlp"):
        convert_tlora(src, tmp_path / "c.safetensors", to="comfyui-tlora")
    from tlora_diffusers.io import node_settings, read_tlora

    text = node_settings(read_tlora(src))
    assert "max_rank 4, min_rank 2, alpha 1" in text and "max_timestep 1 (Flux" in text
    with pytest.raises(FileExistsError, match="c.safetensors: already exists; pass overwrite=True"):
        convert_tlora(src, tmp_path / "c.safetensors", to="comfyui-tlora")
    with pytest.raises(ValueError, match=r"x.txt: not a .safetensors path, and a new folder named like a file \(.txt\)"):
        convert_tlora(src, tmp_path / "x.txt", to="kohya")


def test_fork_rank_formula_equals_ours():
    for t in range(0, 1001, 7):
        assert fork_rank(t) == reference_rank(t, R, MIN, EXP)
    assert math.isclose(EXP, 1.5)


def node_deltas(file, flux, max_timestep, cfg):
    """What the ComfyUI-T-LoRA node adds to each module, written from its source (nodes_tlora.py@d9c993d):
    keys matched by its regex (``unet.`` stripped), ``to_out`` -> ``to_out.0``, ``to_{q,k,v}_proj`` ->
    ``add_{q,k,v}_proj`` (``_candidate_base_keys``), no alpha and no metadata (linear: ``up(down(x) ⊙ m)``,
    270-291; ortho: ``P diag(λ ⊙ m) Q x − P0 diag(λ0 ⊙ m) Q0 x``, 294-346), ``m`` the first ``r`` ranks with
    ``r = int(((T − t) / T) ** alpha · (R − m)) + m`` (54-85), ``t`` what ComfyUI passes: the discrete timestep
    for SDXL, the flow time σ = t / 1000 for Flux (model_sampling.py)."""
    import re

    pattern = re.compile(r"^(?:unet\.)?(?P<base>.+?\.to_(?:q|k|v|out(?:\.0)?|q_proj|k_proj|v_proj))_lora\.(?P<param>.+)$")
    groups = {}
    for key, value in load_file(str(file)).items():
        m = pattern.match(key)
        assert m, key  # the export writes nothing the node skips
        groups.setdefault(m["base"], {})[m["param"]] = value.double()

    def rank(t):
        node_t = t / 1000.0 if flux else t
        progress = max(0.0, min(1.0, (max_timestep - node_t) / max_timestep)) ** cfg.alpha
        return min(int(progress * (cfg.max_rank - cfg.min_rank)) + cfg.min_rank, cfg.max_rank)

    deltas = {}
    for base, p in groups.items():
        path = base.removeprefix("transformer.").replace(".processor.", ".")
        path = re.sub(r"\.to_out$", ".to_out.0", path)
        path = re.sub(r"\.to_(q|k|v)_proj$", r".add_\1_proj", path)

        def add(x, t, p=p):
            r, x = rank(t), x.double()
            if "down.weight" in p:
                return (x @ p["down.weight"][:r].T) @ p["up.weight"][:, :r].T
            live = ((x @ p["q_layer.weight"][:r].T) * p["lambda_layer"][0, :r]) @ p["p_layer.weight"][:, :r].T
            base_ = ((x @ p["base_q.weight"][:r].T) * p["base_lambda"][0, :r]) @ p["base_p.weight"][:, :r].T
            return live - base_
        deltas[path] = add
    return deltas


@pytest.mark.parametrize("case_name, layout", [("sdxl", "plain"), ("sdxl", "paired"), ("flux", "plain")])
@torch.no_grad()
def test_comfyui_tlora_export_computes_in_the_node_what_tlora_diffusers_computes(tmp_path, case_name, layout):
    cfg = TLoRAConfig(4, 1, 2.0, layout=layout)
    targets = ATTENTION + (("add_q_proj", "add_k_proj", "add_v_proj") if case_name == "flux" else ())
    src = ours(tmp_path, case_name, cfg, targets)
    exported = convert_tlora(src, tmp_path / "node.safetensors", to="comfyui-tlora")
    flux = case_name == "flux"
    max_timestep = 1 if flux else 1000  # the node settings convert prints (test_comfyui_export_names_...)
    case = CASES[case_name]
    pipe = case.build(0)
    attr = case.denoiser_attrs[0]
    expected = hooked_reference(pipe, attr, node_deltas(exported, flux, max_timestep, cfg),
                                lambda: output(pipe(**case.inputs(pipe, 0))))
    assert len(node_deltas(exported, flux, max_timestep, cfg)) == len(
        [n for n, _ in getattr(pipe, attr).named_modules() if n.endswith(targets)])  # every target reaches the node
    torch.testing.assert_close(masked_output(case_name, src), expected, rtol=0, atol=1e-4)


def anima_name(path):
    """Anima's diffusers path -> the fork's kohya name on the native module (lora_tlora_anima.py:541-542 at
    orangemagic123/sd-scripts@e80717d; the inverse of diffusers' _convert_non_diffusers_anima_lora_to_diffusers)."""
    import re

    m = re.match(r"transformer_blocks\.(\d+)\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)$", path)
    if m:
        proj = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "output_proj"}[m[3]]
        return f"lora_unet_blocks_{m[1]}_{'self_attn' if m[2] == 'attn1' else 'cross_attn'}_{proj}"
    m = re.match(r"transformer_blocks\.(\d+)\.ff\.net\.(0\.proj|2)$", path)
    if m:
        return f"lora_unet_blocks_{m[1]}_mlp_{'layer1' if m[2] == '0.proj' else 'layer2'}"
    return None


@torch.no_grad()
def test_sd_scripts_fork_anima_tlora_loads_with_its_flow_time_schedule(tmp_path):
    """The fork's Anima network masks by σ in [0, 1] with T = ss_tlora_max_timestep = 1.0 (lora_tlora_anima.py:
    636-681): r = int(((1 − σ) / 1) ** a · (R − m)) + m, the same ranks as the loop's t = 1000·σ with T = 1000.
    (The fork itself samples these files at full rank, :655-658; a T-LoRA runs with the mask it was trained with.)"""
    case = CASES["anima"]
    pipe = case.build(0)
    modules = dict(pipe.transformer.named_modules())
    sd, deltas, alpha = {}, {}, 2.0
    for i, path in enumerate(sorted(p for p in modules if anima_name(p))):
        m = modules[path]
        down, up = random_tensors(200 + i, [(R, m.in_features), (m.out_features, R)])
        key = anima_name(path)
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"] = down, up, torch.tensor(alpha)

        def add(x, t, down=down, up=up):  # the fork's vanilla forward (:109-173): slices [:r] at σ = t / 1000
            sigma = t / 1000.0
            r = max(MIN, min(int(((1.0 - sigma) / 1.0) ** EXP * (R - MIN)) + MIN, R))
            return ((x.double() @ down[:r].double().T) @ up[:, :r].double().T) * alpha / R
        deltas[path] = add
    assert len(deltas) >= 10
    file = tmp_path / "anima_tlora.safetensors"
    save_file(sd, str(file), metadata={**FORK_META, "ss_network_module": "networks.lora_tlora_anima",
                                       "ss_tlora_max_timestep": "1.0", "ss_base_model_version": "anima"})
    expected = hooked_reference(pipe, "transformer", deltas, lambda: output(pipe(**case.inputs(pipe, 0))))
    info = load_tlora(pipe, file)
    assert info.config == TLoRAConfig(R, MIN, EXP) and info.meta.source_format == "sd-scripts-tlora"
    with TLoRAPatch(pipe):
        got = output(pipe(**case.inputs(pipe, 0)))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_the_command_line_asks_a_kohya_file_for_the_model_not_for_a_lycoris_base(tmp_path, capsys):
    """A kohya file whose names need the base model's modules is told to pass --model for that reason (not the
    LyCORIS "frozen base" message)."""
    from tlora_diffusers.cli import main

    src = ours(tmp_path, "flux", TLoRAConfig(4, 1, 1.0), ("to_q", "to_k"))
    kohya = convert_tlora(src, tmp_path / "k.safetensors", to="kohya")
    assert main(["convert", str(kohya), str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err
    assert "module names of this kohya file are resolved against the base model's own modules" in err
    assert "--model PATH" in err and "LyCORIS" not in err
    from tlora_diffusers.tiny import save_tiny_pipeline

    model = save_tiny_pipeline("flux", tmp_path / "flux", text_encoders=False)  # the advice: pass --model
    assert main(["convert", str(kohya), str(tmp_path / "back"), "--model", str(model)]) == 0
    assert read_schedule(tmp_path / "back" / "pytorch_lora_weights.safetensors") == TLoRAConfig(4, 1, 1.0)
