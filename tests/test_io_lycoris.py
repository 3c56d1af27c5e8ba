"""LyCORIS / SimpleTuner tlora files: parity with LyCORIS's own modules, schedule sources, errors."""

import contextlib
import json
from unittest import mock

import pytest
import torch
from conftest import state_hash

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from tlora_diffusers.io import load_tlora, read_tlora
from tlora_diffusers.io.lycoris import NeedsInputError
from tlora_diffusers.tiny import tiny_pipeline

lycoris = pytest.importorskip("lycoris")
from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights  # noqa: E402
from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask  # noqa: E402

RANK, MIN_RANK, ALPHA = 8, 2, 1.5
CFG = TLoRAConfig(RANK, MIN_RANK, ALPHA, layout="paired")
#: What SimpleTuner writes into the file header (``save_hooks._save_lycoris``).
SIMPLETUNER_CONFIG = {"algo": "tlora", "multiplier": 1.0, "linear_dim": RANK, "linear_alpha": 4,
                      "tlora_min_rank": MIN_RANK, "tlora_alpha": ALPHA}
PRESETS = {
    "sdxl": {"target_module": ["Attention", "FeedForward"], "target_name": ["down_blocks.1.resnets.0.conv_shortcut"]},
    "flux": {"target_module": ["FluxAttention", "FeedForward"]},
}
_PRESET_ATTRS = {"enable_conv": "ENABLE_CONV", "target_module": "TARGET_REPLACE_MODULE", "target_name": "TARGET_REPLACE_NAME",
                 "module_algo_map": "MODULE_ALGO_MAP", "name_algo_map": "NAME_ALGO_MAP", "lora_prefix": "LORA_PREFIX",
                 "use_fnmatch": "USE_FNMATCH", "exclude_name": "TARGET_EXCLUDE_NAME"}
TIMESTEPS = (0, 137, 420, 777, 999)


@contextlib.contextmanager
def lycoris_preset(preset):
    """LyCORIS keeps its presets on the class (global state): set one, then restore the original."""
    saved = {key: getattr(LycorisNetwork, attr) for key, attr in _PRESET_ATTRS.items()}
    LycorisNetwork.apply_preset(preset)
    try:
        yield
    finally:
        LycorisNetwork.apply_preset(saved)


@pytest.fixture(autouse=True)
def _lycoris_global_state():
    before = {attr: getattr(LycorisNetwork, attr) for attr in _PRESET_ATTRS.values()}
    yield
    clear_timestep_mask()
    assert {attr: getattr(LycorisNetwork, attr) for attr in _PRESET_ATTRS.values()} == before


def denoiser_of(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def train_lycoris(kind, path, *, dtype=torch.float32, metadata=None, preset=None, seed=0):
    """A tiny pipeline with a LyCORIS tlora network whose q/p/lambda moved away from the SVD init, saved
    with LyCORIS's own ``save_weights``. Returns the (still wrapped) denoiser and the file."""
    pipe = tiny_pipeline(kind)
    den = denoiser_of(pipe)
    # LyCORIS runs gc.collect() per module while building (seconds on a big heap); skipped here.
    with lycoris_preset(preset or PRESETS[kind]), mock.patch("gc.collect", return_value=0):
        net = create_lycoris(den, 1.0, linear_dim=RANK, linear_alpha=4, algo="tlora")
        net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.loras:
            for w in (lora.q_layer.weight, lora.p_layer.weight):
                w.add_(0.05 * torch.randn(w.shape, generator=g))
            lora.lambda_layer.mul_(1 + 0.3 * torch.randn(lora.lambda_layer.shape, generator=g))
    if metadata is None:
        metadata = {"lycoris_config": json.dumps({**SIMPLETUNER_CONFIG, "apply_preset": preset or PRESETS[kind]})}
    net.save_weights(str(path), dtype, metadata)
    return den, path


def inputs(kind, den, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = den.config
    if kind == "sdxl":
        te = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        return dict(sample=torch.randn(batch, c.in_channels, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(batch, 5, c.cross_attention_dim, generator=g),
                    added_cond_kwargs={"text_embeds": torch.randn(batch, te, generator=g),
                                       "time_ids": torch.randn(batch, 6, generator=g)})
    n = 16
    img_ids = torch.stack([torch.zeros(n), torch.arange(n) // 4, torch.arange(n) % 4], -1).float()
    return dict(hidden_states=torch.randn(batch, n, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
                img_ids=img_ids, txt_ids=torch.zeros(5, 3), guidance=torch.full((batch,), 3.5))


def call(kind, den, x, t):
    """One denoiser call at scheduler timestep(s) ``t``; Flux's transformer receives ``t / 1000``."""
    if kind == "sdxl":
        return den(timestep=t, **x).sample
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x["hidden_states"].shape[0])
    return den(timestep=t / 1000, **x, return_dict=False)[0]


def slice_inputs(x, i):
    out = {}
    for k, v in x.items():
        if isinstance(v, dict):
            out[k] = slice_inputs(v, i)
        elif k in ("img_ids", "txt_ids"):
            out[k] = v
        else:
            out[k] = v[i:i + 1]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """LyCORIS-trained tiny SDXL and Flux denoisers and their files, built once per module."""
    cache = {}

    def get(kind):
        if kind not in cache:
            path = tmp_path_factory.mktemp(f"lyco_{kind}") / "pytorch_lora_weights.safetensors"
            cache[kind] = train_lycoris(kind, path)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
@torch.no_grad()
def test_parity_with_lycoris_modules_and_per_sample_batches(kind, trained):
    lyco_den, path = trained(kind)
    pipe = tiny_pipeline(kind)
    info = load_tlora(pipe, path)
    assert (info.format, info.config, info.meta.variant) == ("lycoris", CFG, "ortho")
    den = denoiser_of(pipe)
    x = inputs(kind, den)
    with TLoRAPatch(pipe):
        outs = []
        for t in TIMESTEPS:
            set_timestep_mask(compute_timestep_mask(t, 1000, RANK, MIN_RANK, ALPHA))
            expected = call(kind, lyco_den, x, t)
            got = call(kind, den, x, t)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            outs.append(got)
        # the adapter matters at every mask, and the masks differ
        assert all((a - b).abs().max() > 1e-3 for a, b in zip(outs, outs[1:]))
        base = call(kind, denoiser_of(tiny_pipeline(kind)), x, 500)
        assert (call(kind, den, x, 500) - base).abs().max() > 1e-2

        # batch > 1 with different timesteps: each sample as if run alone
        xb, ts = inputs(kind, den, batch=3, seed=1), torch.tensor([10.0, 500.0, 990.0])
        batched = call(kind, den, xb, ts)
        for i in range(3):
            single = call(kind, den, slice_inputs(xb, i), ts[i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-4, atol=1e-5)
            set_timestep_mask(compute_timestep_mask(int(ts[i]), 1000, RANK, MIN_RANK, ALPHA))
            torch.testing.assert_close(single, call(kind, lyco_den, slice_inputs(xb, i), ts[i:i + 1]), rtol=0, atol=1e-5)
    # LyCORIS itself cannot: a (B, R) mask crashes its default-mode forward
    set_timestep_mask(torch.cat([compute_timestep_mask(int(t), 1000, RANK, MIN_RANK, ALPHA) for t in ts]))
    with pytest.raises(RuntimeError):
        call(kind, lyco_den, xb, ts)


@torch.no_grad()
def test_schedule_sources_and_conflicts(trained, tmp_path):
    lyco_den, path = trained("sdxl")
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, bare)  # LyCORIS's save_weights without SimpleTuner's header
    unet = tiny_pipeline("sdxl").unet
    with pytest.raises(NeedsInputError, match=r"bare.safetensors.*lycoris_config='path/to/lycoris_config.json'") as e:
        read_tlora(bare, unet)
    assert e.value.needs == "cfg"
    config_json = tmp_path / "lycoris_config.json"
    config_json.write_text(json.dumps(SIMPLETUNER_CONFIG))
    assert read_tlora(bare, unet, lycoris_config=config_json).meta.config == CFG
    assert read_tlora(bare, unet, min_rank=MIN_RANK, alpha=ALPHA).meta.config == CFG
    assert read_tlora(bare, unet, CFG).meta.config == CFG
    # the layout is the file's business: a plain config is read as the paired encoding the file loads as
    assert read_tlora(bare, unet, TLoRAConfig(RANK, MIN_RANK, ALPHA)).meta.config == CFG
    with pytest.raises(ValueError, match="cfg.max_rank=4 but the file's tensors have rank 8"):
        read_tlora(bare, unet, TLoRAConfig(4, layout="paired"))
    # metadata that contradicts the tensors, or is not a tlora config
    for meta, message in [({**SIMPLETUNER_CONFIG, "linear_dim": 16}, "linear_dim=16 but the file's q_layer weights have rank 8"),
                          ({**SIMPLETUNER_CONFIG, "algo": "lokr"}, "'algo' must be 'tlora'"),
                          ({**SIMPLETUNER_CONFIG, "tlora_min_rank": 9}, "min_rank must be an int in"),
                          ("not json", "not valid JSON")]:
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, bad, {"lycoris_config": meta if isinstance(meta, str) else json.dumps(meta)})
        pipe = tiny_pipeline("sdxl")
        before = state_hash(pipe.unet)
        with pytest.raises(ValueError, match=message) as e:
            load_tlora(pipe, bad)
        assert "bad.safetensors" in str(e.value)
        assert state_hash(pipe.unet) == before and not getattr(pipe.unet, "peft_config", None)


@torch.no_grad()
def test_half_precision_file_warns_and_matches_lycoris_own_loader(tmp_path):
    """A bf16 file: the base is rebuilt in fp32 from the model, inexactly; LyCORIS's loader does the same."""
    _, path = train_lycoris("sdxl", tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    pipe = tiny_pipeline("sdxl")
    with pytest.warns(UserWarning, match="rebuilt approximately.*bfloat16.*LyCORIS's own loader"):
        converted = read_tlora(path, pipe.unet)
    assert any("bfloat16" in n for n in converted.notes)
    with pytest.warns(UserWarning, match="rebuilt approximately"):
        load_tlora(pipe, path)
    reference = tiny_pipeline("sdxl").unet
    with lycoris_preset({}), mock.patch("gc.collect", return_value=0):
        net, _ = create_lycoris_from_weights(1.0, str(path), reference)
        net.apply_to()
    x = inputs("sdxl", reference)
    with TLoRAPatch(pipe):
        for t in (100, 900):
            set_timestep_mask(compute_timestep_mask(t, 1000, RANK, MIN_RANK, ALPHA))
            torch.testing.assert_close(call("sdxl", pipe.unet, x, t), call("sdxl", reference, x, t), rtol=0, atol=1e-5)


@torch.no_grad()
def test_sig_type_option_and_use_data_init_refused(tmp_path):
    preset = {"target_module": ["Attention"], "module_algo_map": {"Attention": {"sig_type": "last"}}}
    lyco_den, path = train_lycoris("sdxl", tmp_path / "last.safetensors", preset=preset)
    x = inputs("sdxl", lyco_den)
    set_timestep_mask(compute_timestep_mask(300, 1000, RANK, MIN_RANK, ALPHA))
    expected = call("sdxl", lyco_den, x, 300)
    results = {}
    for sig_type in ("last", "principal"):
        pipe = tiny_pipeline("sdxl")
        load_tlora(pipe, path, sig_type=sig_type)
        with TLoRAPatch(pipe):
            results[sig_type] = call("sdxl", pipe.unet, x, 300)
    torch.testing.assert_close(results["last"], expected, rtol=0, atol=1e-5)
    assert (results["principal"] - expected).abs().max() > 1e-2  # what LyCORIS's own loader would do
    with pytest.raises(ValueError, match="use_data_init=False.*cannot be rebuilt"):
        load_tlora(tiny_pipeline("sdxl"), path, use_data_init=False)
    with pytest.raises(ValueError, match="sig_type must be one of"):
        load_tlora(tiny_pipeline("sdxl"), path, sig_type="top")


def test_bad_lycoris_files_clear_errors_pipeline_unchanged(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = trained("sdxl")
    tensors = load_file(path)
    name = "lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    k3 = "lycoris_down_blocks_1_resnets_0_conv1"  # a 3x3 conv
    cases = {
        "conv3x3": ({**tensors, f"{k3}.q_layer.weight": torch.randn(8, 32, 1, 1), f"{k3}.p_layer.weight": torch.randn(64, 8, 1, 1),
                     f"{k3}.lambda_layer": torch.ones(1, 8), f"{k3}.alpha": torch.tensor(4.0)}, "only works for 1x1 convolutions"),
        "mixed": ({**tensors, "lycoris_conv_in.lora_down.weight": torch.randn(8, 4, 3, 3)}, "mixes LyCORIS algorithms"),
        "shape": ({**tensors, f"{name}.q_layer.weight": torch.randn(8, 48)}, "do not fit the layer"),
        "incomplete": ({k: v for k, v in tensors.items() if k != f"{name}.p_layer.weight"}, "incomplete tlora modules"),
        "ranks": ({**tensors, f"{name}.q_layer.weight": torch.randn(4, 64), f"{name}.p_layer.weight": torch.randn(64, 4),
                   f"{name}.lambda_layer": torch.ones(1, 4)}, "different ranks"),
    }
    meta = {"lycoris_config": json.dumps(SIMPLETUNER_CONFIG)}
    for case, (tensors_, message) in cases.items():
        bad = tmp_path / f"{case}.safetensors"
        save_file(tensors_, bad, meta)
        pipe = tiny_pipeline("sdxl")
        before = state_hash(pipe.unet)
        with pytest.raises(ValueError, match=message) as e:
            load_tlora(pipe, bad)
        assert bad.name in str(e.value), case
        assert state_hash(pipe.unet) == before and not getattr(pipe.unet, "peft_config", None)
    # another base model: the names do not exist there
    flux = tiny_pipeline("flux")
    before = state_hash(flux.transformer)
    with pytest.raises(ValueError, match=r"do not exist in FluxTransformer2DModel \(a file for another base model"):
        load_tlora(flux, path)
    assert state_hash(flux.transformer) == before and not getattr(flux.transformer, "peft_config", None)
    # no denoiser: the base cannot be rebuilt
    with pytest.raises(NeedsInputError, match="pass the denoiser") as e:
        read_tlora(path)
    assert e.value.needs == "denoiser" and e.value.partial["rank"] == RANK


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.narrow = torch.nn.Linear(6, 40)  # rank 8 > min(out, in): LyCORIS pads the basis
        self.pointwise = torch.nn.Conv1d(16, 24, 1)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])


@torch.no_grad()
def test_padded_rank_conv1d_and_lora_prefix_match_lycoris_deltas(tmp_path):
    """Dummy modules: our rank-2R factors reproduce LyCORIS's own ``get_diff_weight`` under every mask."""
    torch.manual_seed(0)
    model = _Net()
    with lycoris_preset({"target_module": ["_Block"], "lora_prefix": "lyco"}), mock.patch("gc.collect", return_value=0):
        net = create_lycoris(model, 1.0, linear_dim=RANK, linear_alpha=2, algo="tlora")
        net.apply_to()
    for lora in net.loras:
        for w in (lora.q_layer.weight, lora.p_layer.weight, lora.lambda_layer):
            w.add_(0.1 * torch.randn_like(w))
    path = tmp_path / "dummy.safetensors"
    net.save_weights(str(path), torch.float32, None)
    with pytest.raises(ValueError, match="do not exist in _Net .*lora_prefix is not 'lycoris'"):
        read_tlora(path, model, min_rank=0)
    converted = read_tlora(path, model, min_rank=0, lora_prefix="lyco")
    assert sorted(converted.meta.target_modules) == [f"blocks.{i}.{n}" for i in (0, 1) for n in ("narrow", "pointwise")]
    for lora in net.loras:
        module_path = lora.lora_name[len("lyco_"):].replace("_", ".")
        a, b = converted.state_dict[f"{module_path}.lora_A.weight"], converted.state_dict[f"{module_path}.lora_B.weight"]
        for t in (0, 300, 800, 1000):
            mask = compute_timestep_mask(t, 1000, RANK, 0, 1.0)
            set_timestep_mask(mask)
            expected, _ = lora.get_diff_weight()
            ours = (b.flatten(1) * mask[0].repeat_interleave(2)) @ a.flatten(1)
            torch.testing.assert_close(ours.reshape(expected.shape), expected, rtol=0, atol=1e-5)
