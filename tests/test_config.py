import json
import math

import pytest

from tlora_diffusers import TLoRAConfig


def test_defaults_and_round_trip():
    cfg = TLoRAConfig(64)
    assert (cfg.max_rank, cfg.min_rank, cfg.alpha) == (64, 1, 1.0)
    d = cfg.to_dict()
    assert d["format_version"] == 1
    assert TLoRAConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert TLoRAConfig.from_dict(TLoRAConfig(8, 0, 2).to_dict()) == TLoRAConfig(8, 0, 2.0)


def test_frozen():
    cfg = TLoRAConfig(8)
    with pytest.raises(Exception):
        cfg.max_rank = 4


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(max_rank=0), "max_rank must be an int in [1, 65536], got 0"),
        (dict(max_rank=-3), "got -3"),
        (dict(max_rank=10**9), "max_rank must be an int in [1, 65536], got 1000000000"),
        (dict(max_rank=8.0), "max_rank must be an int"),
        (dict(max_rank=True), "got True"),
        (dict(max_rank="8"), "got '8'"),
        (dict(max_rank=8, min_rank=9), "min_rank must be an int in [0, max_rank=8], got 9"),
        (dict(max_rank=8, min_rank=-1), "got -1"),
        (dict(max_rank=8, min_rank=1.5), "got 1.5"),
        (dict(max_rank=8, min_rank=False), "got False"),
        (dict(max_rank=8, alpha=0), "alpha must be a finite number > 0, got 0"),
        (dict(max_rank=8, alpha=-1.0), "got -1.0"),
        (dict(max_rank=8, alpha=math.nan), "got nan"),
        (dict(max_rank=8, alpha=math.inf), "got inf"),
        (dict(max_rank=8, alpha=True), "got True"),
        (dict(max_rank=8, alpha="1"), "got '1'"),
    ],
)
def test_invalid_values_name_field_range_and_value(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        TLoRAConfig(**kwargs)
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"max_rank": 8, "rank": 4}, "unknown keys ['rank']"),
        ({"format_version": 99, "max_rank": 8}, "format_version must be 1, got 99"),
        ({"min_rank": 1}, "needs 'max_rank'"),
        ([8], "expects a mapping, got list"),
    ],
)
def test_from_dict_errors(data, fragment):
    with pytest.raises(ValueError, match=None) as e:
        TLoRAConfig.from_dict(data)
    assert fragment in str(e.value)


def test_from_lycoris_config_keys_and_defaults():
    simpletuner = {"algo": "tlora", "multiplier": 1.0, "linear_dim": 64, "linear_alpha": 32,
                   "tlora_min_rank": 8, "tlora_alpha": 2.0}
    assert TLoRAConfig.from_lycoris_config(simpletuner) == TLoRAConfig(64, 8, 2.0)
    assert TLoRAConfig.from_lycoris_config({"algo": "tlora", "linear_dim": 16}) == TLoRAConfig(16, 1, 1.0)
    with pytest.raises(ValueError, match="'algo' must be 'tlora'.*got 'lora'"):
        TLoRAConfig.from_lycoris_config({"algo": "lora", "linear_dim": 16})
    with pytest.raises(ValueError, match="needs 'linear_dim'"):
        TLoRAConfig.from_lycoris_config({"algo": "tlora"})
    with pytest.raises(ValueError, match="min_rank must be an int in \\[0, max_rank=4\\], got 8"):
        TLoRAConfig.from_lycoris_config({"linear_dim": 4, "tlora_min_rank": 8})


def test_layout():
    cfg = TLoRAConfig(8, layout="paired")
    assert cfg.lora_rank == 16 and TLoRAConfig(8).lora_rank == 8
    assert TLoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"layout must be one of \('plain', 'paired'\), got 'pairs'"):
        TLoRAConfig(8, layout="pairs")
