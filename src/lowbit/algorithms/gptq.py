"""GPTQ / LDLQ adaptive rounding of weight matrices against a proxy Hessian, for any scalar format.

Columns are rounded one at a time onto the format's grid (``vector_dim`` columns at a time, jointly, for vector
codebooks: block LDLQ as in QuIP#); each rounding error is fed forward to the columns not
yet rounded through the inverse-Hessian Cholesky factor, so later columns compensate (GPTQ, Frantar et al.
2022; identical to QuIP's LDLQ). Lazy updates at two levels keep it fast: within a sub-block of 16 columns each
error is fed forward at once, to the rest of the sub-block only; a finished sub-block's errors reach the rest of its
block (128 columns) in one matrix product, and a finished block's the rest of the matrix in another. The result is
the same computation up to float reassociation; the per-column updates stay in cache, which on a CPU halves the
time of a large matrix.

Shared Hessians: the rows of W are independent given H, so weights that read the same input (q/k/v, gate/up)
are one problem: :func:`factor_hessian` damps and factors H once (with its act-order permutation), and
:func:`gptq_quantize_shared` rounds their stacked rows in one pass and splits the result back per weight.

Group parameters: without act-order, a group's scale is fitted when its first column is reached, on the
already-updated weights of the group (as GPTQ does). With act-order (columns visited by decreasing diag(H)),
every group's parameters are fitted up front on the original weights ("static groups"), so the stored layout
stays contiguous groups with no column permutation to carry around.

CUDA graphs: the column loop is a few small kernels per column (a 7B layer has ~23k columns), so on a GPU its cost
is launching them, not computing. With static group parameters every block of the same width runs the same
kernels on the same shapes, so it is captured once as a CUDA graph and replayed per block (:class:`_BlockGraphs`):
the same kernels in the same order, hence bit-identical results. Formats whose rounding cannot be captured (a host
synchronization inside) run eagerly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lowbit.calibration.capture import cuda_tf32
from lowbit.errors import LowbitError
from lowbit.formats import Format, Params, QuantizedTensor, UniformFormat, cat_params

MAX_DAMP_RETRIES = 6
SUB_BLOCK = 16  # columns whose errors are fed forward one at a time (see the module docstring)
IMPLEMENTATION = 5  # bumped when results change bit-wise (resume fingerprints include it); 2: sub-blocks,
# 3: vector codebooks round by importance-weighted distance, 4: +rht siblings share their input-side rotation


@dataclass
class GPTQResult:
    qt: QuantizedTensor
    proxy_loss: float  # tr((W - Q) H (W - Q)^T) with the undamped H
    damp: float  # relative damping finally used (fraction of mean diag(H))
    retries: int  # Cholesky failures that raised the damping


@dataclass
class HessianFactor:
    """What GPTQ needs of one Hessian, computed once for every weight that reads the same input."""

    H: torch.Tensor  # the undamped Hessian (float32): what proxy losses are measured against
    U: torch.Tensor  # upper Cholesky factor of the damped inverse, rows and columns in ``order``
    order: torch.Tensor | None  # act-order: columns by decreasing diag(H); None: natural order
    dead: torch.Tensor  # [cols] bool: inputs that never fire (their weights cannot matter and are zeroed)
    importance: torch.Tensor  # diag(H), dead inputs set to 1, natural order: what group fits weigh
    damp: float
    retries: int


@cuda_tf32(False)  # GPTQ's arithmetic is exact float32 whatever the caller's setting
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


@cuda_tf32(False)
def factor_hessian(H: torch.Tensor, percdamp: float = 0.01, act_order: bool = False,
                   shrink: float = 0.0) -> HessianFactor:
    """Damp and factor ``H`` [in, in] (2/N X^T X of the inputs) once, in act-order when asked. ``shrink`` pulls the
    off-diagonal part toward zero, H' = (1 - shrink) H + shrink diag(H): a covariance estimate from few calibration
    tokens trusts their correlations less (the diagonal, llama.cpp's importance, is kept whole)."""
    H_orig = H.detach().float()
    if not torch.isfinite(H_orig).all():
        raise LowbitError("non-finite weights or Hessian")
    H = H_orig.clone()
    if shrink:
        diag = H.diagonal().clone()
        H.mul_(1 - shrink).diagonal().copy_(diag)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    importance = H.diagonal().clone()
    order = torch.argsort(importance, descending=True) if act_order else None
    if order is not None:
        H = H[order][:, order]
    U, damp, retries = inverse_cholesky(H, percdamp)
    return HessianFactor(H_orig, U, order, dead, importance, damp, retries)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, fmt: Format, blocksize: int = 128, percdamp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False) -> GPTQResult:
    """Quantize ``w`` [out, in] given ``H`` [in, in] (2/N X^T X of its inputs) into ``fmt``.

    ``static_groups``: fit every group's parameters up front on the original weights even in natural order (what
    act-order always does), instead of on the error-updated weights when the group is reached."""
    _check_act_order(fmt, act_order)
    if H.shape != (w.shape[1], w.shape[1]):
        raise LowbitError(f"Hessian shape {tuple(H.shape)} does not match weight columns {w.shape[1]}")
    return gptq_quantize_shared([w], factor_hessian(H, percdamp, act_order), fmt, blocksize, static_groups)[0]


@cuda_tf32(False)
def gptq_quantize_shared(ws: Sequence[torch.Tensor], factor: HessianFactor, fmt: Format, blocksize: int = 128,
                         static_groups: bool = False, weighted_search: bool = True) -> list[GPTQResult]:
    """Quantize weights that read the same input (``ws``, each [out_i, in]) against one factored Hessian.

    Their rows are stacked and rounded in one pass (one column loop, one set of block products), which is the
    computation separate calls would make; each result has its own packed tensor and proxy loss.
    ``weighted_search``: a vector codebook's codeword search weighs each column by diag(H); False for Hessians
    made incoherent by a rotation, where the plain distance measured better (see ``_round``)."""
    cols = ws[0].shape[1]
    if factor.H.shape != (cols, cols) or any(w.shape[1] != cols for w in ws):
        raise LowbitError(f"Hessian shape {tuple(factor.H.shape)} does not match weight columns "
                          f"{sorted({w.shape[1] for w in ws})}")
    _check_act_order(fmt, factor.order is not None)
    W = torch.cat([w.detach().float() for w in ws]) if len(ws) > 1 else ws[0].detach().float().clone()
    if not torch.isfinite(W).all():
        raise LowbitError("non-finite weights or Hessian")
    codes, params = _round(W, factor, fmt, blocksize, static_groups, weighted_search)
    results, r0 = [], 0
    for w in ws:
        rows = slice(r0, r0 + w.shape[0])
        r0 += w.shape[0]
        qt = fmt.pack(codes[rows], {k: v[rows] for k, v in params.items()}, tuple(w.shape))
        results.append(GPTQResult(qt, proxy_loss(w, fmt.dequantize(qt), factor.H), factor.damp, factor.retries))
    return results


def _check_act_order(fmt: Format, act_order: bool) -> None:
    if act_order and fmt.vector_dim > 1:
        raise LowbitError(f"act-order is not supported for the vector codebook {fmt.name}")


def _round(W: torch.Tensor, f: HessianFactor, fmt: Format, blocksize: int, static_groups: bool,
           weighted_search: bool = True) -> tuple[torch.Tensor, Params]:
    """Codes [rows, cols // vector_dim] and group parameters of ``W`` (modified in place)."""
    rows, cols = W.shape
    gs, n_groups, vd = fmt.group_cols(cols), fmt.n_groups(cols), fmt.vector_dim
    if cols % vd or (gs % vd):
        raise LowbitError(f"{fmt.name}: {cols} columns (groups of {gs}) are not a multiple of the vector size {vd}")
    W[:, f.dead] = 0
    # Uniform grids only: with the K-quants and level sets weighted too, the IQ2_XXS preset's KL rose 0.456 -> 0.478
    # (uniform grids alone: 0.455); vector codebooks were not measured (docs/gguf.md)
    imp = weighted_importance(W, f.importance) if isinstance(fmt, UniformFormat) else f.importance.expand(rows, cols)
    order = f.order
    # A vector codebook rounds vd columns jointly: the nearest codeword is weighed by their diag(H), as the group
    # fits are (a scalar grid's nearest level does not depend on weights). Unweighted, the IQ2_XXS preset's file
    # measured 37.85 / KL 0.448 on the eval split, weighted 32.71 / 0.331 (docs/gguf.md). After a rotation (+rht)
    # the plain distance measured better, as QuIP# rounds E8P: gptq+rht:e8p_ch 79.0 against 87.1 weighted.
    enc_imp = f.importance.expand(rows, cols) if vd > 1 and weighted_search else None
    static = order is not None or static_groups or n_groups == 1
    params: list = [None] * n_groups
    cols_params: Params = {}  # static: every column's parameters, natural order
    if static:
        starts = range(0, cols, gs)
        params = [fmt.fit(W[:, j : j + gs], imp[:, j : j + gs]) for j in starts]
        expanded = [fmt.expand(p, min(gs, cols - j)) for p, j in zip(params, starts, strict=True)]
        cols_params = {k: torch.cat([e[k] for e in expanded], dim=1) for k in expanded[0]}
    if order is not None:
        W = W[:, order]

    # Blocks are whole groups so that a group's columns are all updated when its scale is fitted.
    bs = blocksize if static else max(gs, (blocksize // gs) * gs)
    bs = max(vd, bs // vd * vd)
    sb = max(vd, SUB_BLOCK // vd * vd)
    U = f.U
    runner = _BlockGraphs(fmt, vd, sb) if static and W.is_cuda and vd == 1 else _EagerBlocks(fmt, vd, sb)
    blocks: list[torch.Tensor] = []  # codes of each block, in visiting order
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        U1 = U[i1:i2, i1:i2]
        E1 = None if enc_imp is None else enc_imp[:, i1:i2]
        if static:
            P1 = {k: v[:, i1:i2] if order is None else v[:, order[i1:i2]] for k, v in cols_params.items()}
            W1, Err1, C1 = runner.run(W[:, i1:i2], U1, P1, E1)
        else:
            W1, Err1, C1 = _block_buffers(W[:, i1:i2], vd)
            _fitted_block(fmt, W1, Err1, C1, U1, vd, sb, imp[:, i1:i2], i1, gs, cols, params, E1)
        blocks.append(C1.clone())
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    codes = torch.cat(blocks, dim=1)
    if order is not None:  # back to natural column order
        codes = torch.empty_like(codes).index_copy_(1, order, codes)
    return codes, cat_params(params)


def weighted_importance(W: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Per-weight importance [rows, cols] for fitting a scalar grid's scales, as llama.cpp weighs its imatrix
    (quantize_row_q4_0_impl and the others): the input's importance times sqrt(sigma^2 + w^2), sigma^2 the row's
    mean square, so a large weight's error counts more than a small one's on the same input. Measured on the
    bundled model with the CPU recipe (docs/gguf.md): Q4_0 out-of-domain perplexity 18.75 -> 18.54 and KL
    0.117 -> 0.112; the IQ2_XXS preset's uniform-grid tensors 36.75 -> 36.43 (KL 0.456 -> 0.455)."""
    sigma2 = W.pow(2).mean(dim=1, keepdim=True)
    return importance[None, :] * torch.sqrt(sigma2 + W.pow(2))


def _column_loop(fmt: Format, W1: torch.Tensor, Err1: torch.Tensor, C1: torch.Tensor, U1: torch.Tensor,
                 P1: Params, vd: int, sb: int, start: int = 0, stop: int | None = None, p0: int = 0,
                 imp1: torch.Tensor | None = None) -> None:
    """Round columns ``start``..``stop`` of the block ``W1`` (whose columns from ``p0`` on have the per-column
    parameters ``P1``) in place: codes into ``C1``, scaled errors into ``Err1``, each fed forward to the rest of
    its sub-block, and a finished sub-block's to the rest of the block. Only tensor operations: graph-capturable.

    The loop works on column-major copies: every per-column operation then reads contiguous memory (on a CPU
    a row-major block's column took ~15 µs per elementwise op, its cache lines one per row)."""
    stop = W1.shape[1] if stop is None else stop
    diag = U1.diagonal()
    round_at = fmt.column_rounding({k: v.t().contiguous().t() for k, v in P1.items()})
    Wt, Et, Ct = W1.t().contiguous(), Err1.t().contiguous(), C1.t().contiguous()
    for s0 in range(start, stop, sb):
        end = min(s0 + sb, stop)
        for i in range(s0, end, vd):
            w_blk = Wt[i : i + vd].t()
            c, dq = round_at(w_blk, i - p0, None if imp1 is None else imp1[:, i : i + vd])
            Ct[i // vd : i // vd + c.shape[1]] = c.t()
            diff = w_blk - dq
            if vd == 1:
                err = torch.div(diff, diag[i : i + 1])
                Et[i] = err[:, 0]
                if i + 1 < end:
                    Wt[i + 1 : end] -= U1[i, i + 1 : end, None] * err.t()
            else:  # block LDLQ: E U_bb^-1 U_b,rest is the exact feedback of a jointly rounded block
                err = torch.linalg.solve_triangular(U1[i : i + vd, i : i + vd], diff, upper=True, left=False)
                Et[i : i + vd] = err.t()
                if i + vd < end:
                    Wt[i + vd : end] -= (err @ U1[i : i + vd, i + vd : end]).t()
        if end < W1.shape[1]:  # the finished sub-block's errors reach the rest of the block
            Wt[end:] -= (Et[s0:end].t() @ U1[s0:end, end:]).t()
    W1.copy_(Wt.t())
    Err1.copy_(Et.t())
    C1.copy_(Ct.t())


def _fitted_block(fmt: Format, W1: torch.Tensor, Err1: torch.Tensor, C1: torch.Tensor, U1: torch.Tensor, vd: int,
                  sb: int, importance: torch.Tensor, i1: int, gs: int, cols: int, params: list,
                  imp1: torch.Tensor | None = None) -> None:
    """A block without static parameters: each group (whole groups per block) is fitted on the updated weights
    when its first column is reached, then rounded; ``params[g]`` receives group g's parameters."""
    for i in range(0, W1.shape[1], gs):
        g = (i1 + i) // gs
        stop = min((g + 1) * gs, cols) - i1
        params[g] = fmt.fit(W1[:, i:stop], importance[:, i:stop])
        _column_loop(fmt, W1, Err1, C1, U1, fmt.expand(params[g], stop - i), vd, sb, i, stop, p0=i, imp1=imp1)


def _block_buffers(W1: torch.Tensor, vd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's working copy (contiguous, so the per-column updates stay in cache), its scaled errors and codes."""
    W1 = W1.clone()
    codes = torch.empty(W1.shape[0], W1.shape[1] // vd, dtype=torch.int64, device=W1.device)
    return W1, torch.empty_like(W1), codes


class _EagerBlocks:
    """A static block rounded eagerly (on copies, as a graph's buffers would be)."""

    def __init__(self, fmt: Format, vd: int, sb: int):
        self.fmt, self.vd, self.sb = fmt, vd, sb

    def run(self, W1: torch.Tensor, U1: torch.Tensor, P1: Params,
            imp1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        W1, Err1, C1 = _block_buffers(W1, self.vd)
        _column_loop(self.fmt, W1, Err1, C1, U1, P1, self.vd, self.sb, imp1=imp1)
        return W1, Err1, C1


class _BlockGraphs:
    """Static blocks rounded by replaying one CUDA graph per block width: inputs are copied into the graph's
    buffers, the captured column loop replays, and the buffers are the outputs (valid until the next run)."""

    def __init__(self, fmt: Format, vd: int, sb: int):
        self.fmt, self.vd, self.sb = fmt, vd, sb
        self._graphs: dict[tuple, tuple] = {}
        self._eager: _EagerBlocks | None = None  # set when the format's rounding cannot be captured

    def run(self, W1: torch.Tensor, U1: torch.Tensor, P1: Params,
            imp1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert imp1 is None, "graphs run scalar formats only, whose rounding needs no weights"
        if self._eager:
            return self._eager.run(W1, U1, P1)
        key = (tuple(W1.shape), tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(P1.items())))
        if key not in self._graphs:
            graph = self._capture(W1, U1, P1)
            if graph is None:  # the format's rounding synchronizes with the host: not capturable, stay eager
                self._eager = _EagerBlocks(self.fmt, self.vd, self.sb)
                return self._eager.run(W1, U1, P1)
            self._graphs[key] = graph
        graph, (w, u, p, err, c) = self._graphs[key]
        w.copy_(W1)
        u.copy_(U1)
        for k, v in P1.items():
            p[k].copy_(v)
        graph.replay()
        return w, err, c

    def _capture(self, W1: torch.Tensor, U1: torch.Tensor, P1: Params) -> tuple | None:
        """The graph and its buffers, or None when the warm-up run synchronizes with the host (a capture would
        fail half-way, and a failed capture can leave the CUDA random generator unusable)."""
        w, err, c = _block_buffers(W1, self.vd)
        u, p = U1.clone(), {k: v.clone() for k, v in P1.items()}
        side = torch.cuda.Stream(w.device)
        side.wait_stream(torch.cuda.current_stream(w.device))
        before = torch.cuda.get_sync_debug_mode()
        try:
            torch.cuda.set_sync_debug_mode("error")
            with torch.cuda.stream(side):  # warm-up outside the capture (library handles, caching allocator)
                _column_loop(self.fmt, w.clone(), err, c, u, p, self.vd, self.sb)
        except RuntimeError:
            return None
        finally:
            torch.cuda.set_sync_debug_mode(before)
            torch.cuda.current_stream(w.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            _column_loop(self.fmt, w, err, c, u, p, self.vd, self.sb)
        return graph, (w, u, p, err, c)
