"""Orthogonal T-LoRA math: SVD initialisation and an exact, precision-safe PEFT encoding.

Ortho T-LoRA (paper Sec. 3.2) writes ``ΔW = P·diag(λ⊙m)·Q − P₀·diag(λ₀⊙m)·Q₀`` with P, Q,
λ initialised from an SVD and P₀, Q₀, λ₀ frozen copies, so ``ΔW = 0`` at step 0.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["SIG_TYPES", "svd_basis", "random_basis", "paired_lora_factors", "ortho_delta"]

#: Which singular triplets initialise the adapter (LyCORIS and paper naming).
SIG_TYPES = ("principal", "last", "middle")


def _check_rank(rank: int, out_features: int, in_features: int, where: str) -> None:
    limit = min(out_features, in_features)
    if not 1 <= rank <= limit:
        raise ValueError(
            f"rank {rank} is too large for {where} ({out_features}x{in_features}): an SVD basis has at most "
            f"min(out, in) = {limit} directions; lower the rank or leave this layer out of the targets"
        )


def svd_basis(
    matrix: torch.Tensor, rank: int, sig_type: str = "principal", where: str = "this layer"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P, λ, Q)`` from the SVD ``U·diag(S)·Vh`` of ``matrix`` (…, out, in), as LyCORIS slices it.

    ``principal`` takes the top ``rank`` triplets, ``last`` the bottom ones and ``middle``
    those starting at ``(n - rank) // 2``. Returns P (…, out, r), λ (…, r), Q (…, r, in) in
    float32; batched over leading dimensions (one call for many equally-shaped layers).
    """
    if sig_type not in SIG_TYPES:
        raise ValueError(f"sig_type must be one of {SIG_TYPES}, got {sig_type!r}")
    out_features, in_features = matrix.shape[-2:]
    _check_rank(rank, out_features, in_features, where)
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    n = s.shape[-1]
    start = {"principal": 0, "last": n - rank, "middle": (n - rank) // 2}[sig_type]
    sl = slice(start, start + rank)
    return u[..., :, sl].contiguous(), s[..., sl].contiguous(), vh[..., sl, :].contiguous()


def random_basis(
    out_features: int,
    in_features: int,
    rank: int,
    sig_type: str = "last",
    generator: Optional[torch.Generator] = None,
    where: str = "this layer",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``svd_basis`` of a random N(0, 1/rank²) matrix: the paper's SDXL recipe (``sig_type='last'``)."""
    _check_rank(rank, out_features, in_features, where)
    m = torch.randn(out_features, in_features, generator=generator) / rank
    return svd_basis(m, rank, sig_type, where)


def ortho_delta(p, lam, q, p0, lam0, q0, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``P·diag(λ⊙m)·Q − P₀·diag(λ₀⊙m)·Q₀`` in float64: the reference the encodings are tested against."""
    m = torch.ones_like(lam, dtype=torch.float64) if mask is None else mask.double()
    p, lam, q, p0, lam0, q0 = (t.double() for t in (p, lam, q, p0, lam0, q0))
    return (p * (lam * m)) @ q - (p0 * (lam0 * m)) @ q0


def paired_lora_factors(
    p: torch.Tensor,
    lam: torch.Tensor,
    q: torch.Tensor,
    p0: torch.Tensor,
    lam0: torch.Tensor,
    q0: torch.Tensor,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rank-2R LoRA ``(A, B)`` of an ortho T-LoRA: ranks 2i and 2i+1 carry schedule rank i.

    Each rank's term ``scale·(λᵢ pᵢ qᵢᵀ − λ₀ᵢ p₀ᵢ q₀ᵢᵀ)`` is a rank-2 matrix; it is re-factored in
    float64 (QR of ``[pᵢ, p₀ᵢ]`` and ``[qᵢ, q₀ᵢ]``, SVD of the 2×2 core) into two rank-1 terms
    whose factors scale with ``sqrt`` of the term itself. Writing ``[P, −P₀]·[λQ; λ₀Q₀]``
    instead stores two large products whose bf16 rounding error exceeds a small delta.

    Shapes: p, p0 (out, R); lam, lam0 (R,) or (1, R); q, q0 (R, in). Returns A (2R, in) and
    B (out, 2R) in float32 with ``B[:, 2i:2i+2] @ A[2i:2i+2] = term i``.
    """
    lam, lam0 = lam.reshape(-1).double(), lam0.reshape(-1).double()
    rank = lam.shape[0]
    pp = torch.stack([p.double().T, p0.double().T], dim=-1)  # (R, out, 2)
    qq = torch.stack([q.double(), q0.double()], dim=-1)  # (R, in, 2)
    up, rp = torch.linalg.qr(pp)  # (R, out, 2), (R, 2, 2)
    uq, rq = torch.linalg.qr(qq)
    core = rp @ torch.diag_embed(torch.stack([lam, -lam0], -1) * scale) @ rq.transpose(-1, -2)
    uc, sc, vch = torch.linalg.svd(core)  # (R, 2, 2)
    root = sc.sqrt().unsqueeze(-2)  # (R, 1, 2)
    b = (up @ uc) * root  # (R, out, 2)
    a = (uq @ vch.transpose(-1, -2)) * root  # (R, in, 2)
    B = b.permute(1, 0, 2).reshape(p.shape[0], 2 * rank)
    A = a.permute(0, 2, 1).reshape(2 * rank, q.shape[1])
    return A.float().contiguous(), B.float().contiguous()
