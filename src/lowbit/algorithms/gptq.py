"""GPTQ / LDLQ adaptive rounding of one weight matrix against a proxy Hessian, for any scalar format.

Columns are rounded one at a time onto the format's grid (``vector_dim`` columns at a time, jointly, for vector
codebooks: block LDLQ as in QuIP#); each rounding error is fed forward to the columns not
yet rounded through the inverse-Hessian Cholesky factor, so later columns compensate (GPTQ, Frantar et al.
2022; identical to QuIP's LDLQ). Lazy block updates (block of 128 columns) keep it fast.

Group parameters: without act-order, a group's scale is fitted when its first column is reached, on the
already-updated weights of the group (as GPTQ does). With act-order (columns visited by decreasing diag(H)),
every group's parameters are fitted up front on the original weights ("static groups"), so the stored layout
stays contiguous groups with no column permutation to carry around.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats import Format, QuantizedTensor, cat_params

MAX_DAMP_RETRIES = 6


@dataclass
class GPTQResult:
    qt: QuantizedTensor
    proxy_loss: float  # tr((W - Q) H (W - Q)^T) with the undamped H
    damp: float  # relative damping finally used (fraction of mean diag(H))
    retries: int  # Cholesky failures that raised the damping


def proxy_loss(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    d = (w.float() - q.float())
    return float(((d @ H.float()) * d).sum())


def inverse_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; raises the damping tenfold on failure."""
    mean_diag = float(H.diagonal().mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp, retries = percdamp, 0
    while True:
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp, retries
        retries += 1
        if retries > MAX_DAMP_RETRIES:
            raise LowbitError(f"Hessian is not positive definite even with damping {damp:g} x mean diag")
        damp = damp * 10 if damp > 0 else 0.01


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, fmt: Format, blocksize: int = 128, percdamp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False) -> GPTQResult:
    """Quantize ``w`` [out, in] given ``H`` [in, in] (2/N X^T X of its inputs) into ``fmt``.

    ``static_groups``: fit every group's parameters up front on the original weights even in natural order (what
    act-order always does), instead of on the error-updated weights when the group is reached."""
    W = w.detach().clone().float()
    H_orig = H.detach().float()
    H = H_orig.clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise LowbitError(f"Hessian shape {tuple(H.shape)} does not match weight columns {cols}")
    if not (torch.isfinite(H).all() and torch.isfinite(W).all()):
        raise LowbitError("non-finite weights or Hessian")
    dead = H.diagonal() == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    importance = H.diagonal().clone()

    gs = fmt.group_cols(cols)
    n_groups = fmt.n_groups(cols)
    vd = fmt.vector_dim
    if cols % vd or (gs % vd):
        raise LowbitError(f"{fmt.name}: {cols} columns (groups of {gs}) are not a multiple of the vector size {vd}")
    if act_order and vd > 1:
        raise LowbitError(f"act-order is not supported for the vector codebook {fmt.name}")
    static = act_order or static_groups or n_groups == 1
    params: list = [None] * n_groups
    col_params: list = [None] * n_groups  # per-column form of params[g], what encode/decode take

    def set_params(g: int, p: dict) -> None:
        params[g] = p
        col_params[g] = fmt.expand(p, min((g + 1) * gs, cols) - g * gs)

    if static:
        for g in range(n_groups):
            sl = slice(g * gs, min((g + 1) * gs, cols))
            set_params(g, fmt.fit(W[:, sl], importance[sl]))

    perm = torch.argsort(importance, descending=True) if act_order else torch.arange(cols, device=W.device)
    if act_order:
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv, damp, retries = inverse_cholesky(H, percdamp)

    # Blocks are whole groups so that a group's columns are all updated when its scale is fitted.
    bs = blocksize if static else max(gs, (blocksize // gs) * gs)
    bs = max(vd, bs // vd * vd)
    codes = torch.empty(rows, cols // vd, dtype=torch.int64, device=W.device)
    perm_list = perm.tolist()
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(0, i2 - i1, vd):
            col = perm_list[i1 + i]
            g = col // gs
            if params[g] is None:  # first column of a group (in natural order): fit on updated weights
                end = min((g + 1) * gs, cols) - i1
                set_params(g, fmt.fit(W1[:, i:end], importance[i1 + i : i1 + end]))
            off = col - g * gs
            p = {k: v[:, off : off + vd] for k, v in col_params[g].items()}
            w_blk = W1[:, i : i + vd]
            c = fmt.encode(w_blk, p)
            codes[:, col // vd] = c[:, 0]
            diff = w_blk - fmt.decode(c, p)
            if vd == 1:
                err = diff / Hinv1[i, i]
                W1[:, i:] -= err * Hinv1[i : i + 1, i:]
            else:  # block LDLQ: E U_bb^-1 U_b,rest is the exact feedback of a jointly rounded block
                err = torch.linalg.solve_triangular(Hinv1[i : i + vd, i : i + vd], diff, upper=True, left=False)
                W1[:, i + vd :] -= err @ Hinv1[i : i + vd, i + vd :]
            Err1[:, i : i + vd] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    qt = fmt.pack(codes, cat_params(params), (rows, cols))
    loss = proxy_loss(w, fmt.dequantize(qt), H_orig)
    return GPTQResult(qt, loss, damp, retries)
