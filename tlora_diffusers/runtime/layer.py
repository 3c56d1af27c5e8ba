"""The one object a masked layer carries: which slot it reads, for which adapter, along which dim.

A layer backend installs a :class:`LayerMask` as ``module.__dict__["_tlora"]`` (one
attribute, nothing else is written on the layer) and removes it on uninstall. The masked
layer's ``forward`` reads ``state.slot.mode`` once per call.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

__all__ = ["LayerMask", "LAYER_ATTR", "layer_mask"]

#: Where a masked layer keeps its :class:`LayerMask`.
LAYER_ATTR = "_tlora"


class LayerMask:
    """What one masked layer needs at call time.

    ``slot``: the denoiser's :class:`~tlora_diffusers.runtime.slot.DenoiserSlot`; ``adapter``: the
    adapter whose mask applies; ``rank_dim``: the rank dimension of the layer's output;
    ``tokenwise``: the layer's rows are the tokens of per-token timesteps (``"frames"``: or of
    per-frame timesteps, each frame's tokens in a row); ``name``: for errors;
    ``masked``: this call's masked weight (``WEIGHTS`` mode, a view into its weight group);
    ``group``: the forward argument whose timestep masks this layer instead of the main one
    (LTX-2's audio layers: ``audio_timestep``), or ``None``; ``handles``: hooks to remove on uninstall.
    """

    __slots__ = ("slot", "adapter", "rank_dim", "tokenwise", "name", "masked", "group", "handles", "users")

    def __init__(self, slot: Any, adapter: str, rank_dim: int, tokenwise: Any, name: str) -> None:
        self.slot, self.adapter, self.rank_dim, self.tokenwise, self.name = slot, adapter, rank_dim, tokenwise, name
        self.masked = None
        self.group: Optional[str] = None
        self.handles: list[Any] = []
        self.users = 1  # attachments masking this layer (a layer shared by two denoisers: Z-Image's ControlNet)

    def __repr__(self) -> str:
        return f"LayerMask({self.name}, adapter={self.adapter!r}, rank_dim={self.rank_dim}, tokenwise={self.tokenwise})"

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copy of a masked layer is a plain layer

    def __reduce__(self):
        return (type(None), ())


def layer_mask(module: nn.Module) -> Optional[LayerMask]:
    return module.__dict__.get(LAYER_ATTR)
