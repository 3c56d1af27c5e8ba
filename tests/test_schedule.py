
import pytest
import torch
from conftest import reference_rank
from hypothesis import given, settings
from hypothesis import strategies as st
from lycoris.modules.tlora import compute_timestep_mask

from tlora_diffusers import TLoRAConfig, active_rank, rank_mask

CONFIGS = [(64, 1, 1.0), (64, 1, 2.0), (64, 1, 0.5), (16, 0, 1.7), (32, 32, 1.0), (128, 4, 3.0), (7, 3, 0.33),
           (64, 1, 1.3), (1, 0, 1.0), (1, 1, 1.0)]


@pytest.mark.parametrize("max_rank, min_rank, alpha", CONFIGS)
def test_matches_lycoris_at_every_integer_timestep(max_rank, min_rank, alpha):
    cfg = TLoRAConfig(max_rank, min_rank, alpha)
    t = torch.arange(0, 1001)
    expected = torch.cat([compute_timestep_mask(i, 1000, max_rank, min_rank, alpha) for i in range(1001)])
    assert torch.equal(rank_mask(t, cfg), expected)
    assert torch.equal(rank_mask(t.float(), cfg), expected)


def test_simpletuner_alpha_one_table():
    # SimpleTuner docs, linear_dim=64, tlora_min_rank=1, alpha=1.0.
    t = torch.tensor([0, 250, 500, 750, 999])
    assert active_rank(t, TLoRAConfig(64, 1, 1.0)).tolist() == [64, 48, 32, 16, 1]


def test_formula_not_the_docs_table_for_alpha_two():
    # The docs list 60 ranks at t=250 for alpha=2; the formula (paper, LyCORIS, SimpleTuner code) gives 36.
    assert active_rank(250, TLoRAConfig(64, 1, 2.0)).item() == 36 == reference_rank(250, 64, 1, 2.0)


@pytest.mark.parametrize("t", [0, 1, 999.5, 1000, 0.25, 13.7, 500.0])
def test_python_numbers_and_zero_d(t):
    cfg = TLoRAConfig(16, 2, 1.5)
    r = active_rank(t, cfg)
    assert r.dtype == torch.int64 and r.shape == ()
    assert r.item() == reference_rank(t, 16, 2, 1.5)
    assert rank_mask(torch.tensor(t), cfg).shape == (16,)


def test_shapes_dtypes_device_and_layout():
    cfg = TLoRAConfig(8, 1)
    t = torch.tensor([0.0, 999.0, 500.0])
    mask = rank_mask(t, cfg, dtype=torch.bfloat16)
    assert mask.shape == (3, 8) and mask.dtype == torch.bfloat16 and mask.device == t.device
    for row, r in zip(mask, active_rank(t, cfg)):
        assert row[:r].eq(1).all() and row[r:].eq(0).all()
    for dtype in (torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert active_rank(torch.tensor([250], dtype=dtype), TLoRAConfig(64)).tolist() == [48]


def test_clamps_to_zero_and_T():
    cfg = TLoRAConfig(16, 3, 1.0)
    assert active_rank(torch.tensor([-5.0, -1e9, 1000.0, 1500.0, 1e9]), cfg).tolist() == [16, 16, 3, 3, 3]


def test_num_train_timesteps():
    assert active_rank(50, TLoRAConfig(10, 0), num_train_timesteps=100).item() == 5
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="num_train_timesteps must be an int >= 1"):
            active_rank(1, TLoRAConfig(4), num_train_timesteps=bad)


@pytest.mark.parametrize(
    "t, exc, fragment",
    [
        (float("nan"), ValueError, "must be finite"),
        (torch.tensor([1.0, float("nan")]), ValueError, "must be finite"),
        (torch.tensor(float("inf")), ValueError, "must be finite"),
        (torch.tensor([[[1.0]]]), ValueError, "must be 0-d, 1-d (one per sample) or 2-d (one per sample and token), got shape (1, 1, 1)"),
        (torch.tensor([]), ValueError, "must not be empty"),
        (torch.tensor([True]), TypeError, "real dtype"),
        (True, TypeError, "got bool"),
        ("500", TypeError, "got str"),
        (torch.tensor([1j]), TypeError, "real dtype"),
    ],
)
def test_bad_timesteps(t, exc, fragment):
    with pytest.raises(exc) as e:
        rank_mask(t, TLoRAConfig(4))
    assert fragment in str(e.value)


def test_no_host_sync_meta_tensors():
    """Meta tensors have no data: any .item()/int()/.tolist() on them would raise."""
    t = torch.tensor([10.0, 900.0], device="meta")
    mask = rank_mask(t, TLoRAConfig(8, 1, 2.0))
    assert mask.shape == (2, 8) and mask.device.type == "meta"


@settings(max_examples=300, deadline=None)
@given(
    max_rank=st.integers(1, 256),
    data=st.data(),
    alpha=st.floats(0.05, 8.0),
    t=st.floats(-100.0, 1100.0, allow_nan=False),
)
def test_property_matches_written_out_formula(max_rank, data, alpha, t):
    min_rank = data.draw(st.integers(0, max_rank))
    cfg = TLoRAConfig(max_rank, min_rank, alpha)
    r = active_rank(t, cfg).item()
    assert r == reference_rank(t, max_rank, min_rank, alpha)
    assert min_rank <= r <= max_rank


@settings(max_examples=100, deadline=None)
@given(max_rank=st.integers(1, 64), alpha=st.floats(0.1, 5.0))
def test_property_monotone_in_t(max_rank, alpha):
    r = active_rank(torch.linspace(0, 1000, 257), TLoRAConfig(max_rank, 0, alpha))
    assert (r[1:] <= r[:-1]).all() and r[0] == max_rank and r[-1] == 0


def test_paired_layout_repeats_each_schedule_rank_twice():
    from tlora_diffusers import lora_rank_mask

    cfg = TLoRAConfig(4, 1, 1.0, layout="paired")
    assert cfg.lora_rank == 8
    t = torch.tensor([0.0, 500.0, 1000.0])
    assert lora_rank_mask(t, cfg).tolist() == [[1.0] * 8, [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    assert torch.equal(lora_rank_mask(t, TLoRAConfig(4, 1)), rank_mask(t, TLoRAConfig(4, 1)))
