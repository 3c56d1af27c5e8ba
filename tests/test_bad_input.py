"""Property-based bad input: every value is either valid or a clear error naming the problem."""

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlora_diffusers import TLoRAConfig, rank_mask
from tlora_diffusers.io.format import TLoRAFileMetadata, read_tlora_metadata

ANY = st.one_of(st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                st.text(max_size=5), st.none(), st.lists(st.integers(), max_size=2))


@settings(max_examples=400, deadline=None)
@given(max_rank=ANY, min_rank=ANY, alpha=ANY)
def test_config_valid_or_named_value_error(max_rank, min_rank, alpha):
    try:
        cfg = TLoRAConfig(max_rank, min_rank, alpha)
    except ValueError as e:
        message = str(e)
        assert message.startswith("TLoRAConfig.") and " must be " in message and ", got " in message
        return
    assert isinstance(cfg.max_rank, int) and 1 <= cfg.max_rank <= 65536
    assert isinstance(cfg.min_rank, int) and 0 <= cfg.min_rank <= cfg.max_rank
    assert math.isfinite(cfg.alpha) and cfg.alpha > 0
    assert not isinstance(max_rank, bool) and not isinstance(min_rank, bool) and not isinstance(alpha, bool)


DTYPES = [torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(0, 3), max_size=4),
    dtype=st.sampled_from(DTYPES),
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=81, max_size=81),
)
def test_timesteps_valid_or_clear_error(shape, dtype, values):
    n = math.prod(shape)
    t = torch.tensor(values[:n], dtype=torch.float32).reshape(shape)
    if dtype.is_floating_point:
        t = t.to(dtype)
    elif dtype == torch.bool:
        t = t > 0
    else:
        t = torch.nan_to_num(t, nan=0.0, posinf=100.0, neginf=-100.0).clamp(-100, 100).to(dtype)
    cfg = TLoRAConfig(8, 1, 1.5)
    try:
        mask = rank_mask(t, cfg)
    except (ValueError, TypeError) as e:
        assert "timesteps" in str(e)
        reasons = [t.ndim > 2, n == 0, dtype == torch.bool, bool(t.is_floating_point() and not torch.isfinite(t).all())]
        assert any(reasons), (t, e)
        return
    assert mask.shape == (*t.shape, 8) and t.ndim <= 2 and n > 0
    r = mask.sum(-1)
    clamped = t.double().clamp(0, 1000)
    expected = torch.floor(((1000 - clamped) / 1000) ** 1.5 * 7) + 1
    assert torch.equal(r.double(), expected)


@settings(max_examples=200, deadline=None)
@given(payload=st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                            lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=4)),
                            max_leaves=8))
def test_metadata_json_valid_or_value_error_naming_the_file(payload):
    text = json.dumps(payload)
    try:
        meta = TLoRAFileMetadata.from_json(text, where="some.safetensors")
    except ValueError as e:
        assert str(e).startswith("some.safetensors:")
        return
    assert isinstance(meta.config, TLoRAConfig)


@pytest.mark.parametrize("field, value", [("max_rank", 8.5), ("min_rank", "1"), ("alpha", None), ("layout", 3),
                                          ("variant", "lokr"), ("component", "vae"), ("base_model", 7)])
def test_metadata_wrong_types(field, value):
    data = {"format_version": 1, "max_rank": 8, field: value}
    with pytest.raises(ValueError, match=f"f.safetensors: invalid 'tlora_config': .*{field}"):
        TLoRAFileMetadata.from_json(json.dumps(data), where="f.safetensors")


def test_oversized_metadata_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "big.safetensors"
    save_file({"unet.a.lora_A.weight": torch.zeros(1, 1)}, path, metadata={"tlora_config": "x" * (2 << 20)})
    with pytest.raises(ValueError, match="big.safetensors: metadata is .* bytes, more than the 1048576 allowed"):
        read_tlora_metadata(path)
