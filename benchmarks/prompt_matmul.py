"""A prompt's matmul (M rows of activations) per packed format, at the five large Llama shapes (needs CUDA).

    python benchmarks/prompt_matmul.py --formats q4_k,e8p_ch,iq2_xxs,q4_0,nz2_ch --rows 64,512,2048

For each format, M and shape, the median µs (``triton.testing.do_bench``; eager calls, whose launch cost is small
next to a prompt matmul) of:

* ``lowbit``: the path :func:`lowbit.kernels.dispatch.dequant_matmul` takes;
* ``dense``: the format's Triton dequantize, then fp16 cuBLAS (:func:`lowbit.kernels.dispatch.dense_matmul`);
* ``tiles``: the scalar grids' tile-dequantize + ``tl.dot`` kernel (:mod:`lowbit.kernels.triton_uniform`);
* ``reference``: the torch reference (float32 dequantize, then cuBLAS): the codebook and k-quant formats' prompt
  path before their dequantize kernels;
* ``fp16``: cuBLAS on an fp16 weight of the same shape;
* ``held RxC`` (K-quants, IQ2_XXS, 3-, 5- and 6-bit grids): the dense weight decoded from the CUDA GEMV's kernel
  layout (:mod:`lowbit.kernels.triton_layouts`, programs of R x C weights), then cuBLAS: the prompt path of a weight
  whose stored bytes are held in host memory (``--held-tiles``, default the kernel's own tile).

Prints one table per M (time summed over the five shapes and its ratio to fp16) and writes
``benchmarks/results/prompt-<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from gemv_speed import LARGE, packed_weight  # noqa: E402 - the issue's five large shapes, the same weights
from lowbit.formats import Format, UniformFormat, get_format  # noqa: E402
from lowbit.kernels import dispatch, verified  # noqa: E402
from lowbit.kernels.reference import decode_lut  # noqa: E402

PATHS = ["lowbit", "dense", "tiles", "reference", "fp16"]  # the held paths are added by main


def held_paths(fmt: Format, tiles: list[tuple[int, int]]) -> dict:
    """path -> fn(x, qt, w16): the held prompt path at each tile, where ``fmt`` decodes from a kernel layout."""
    from lowbit.kernels import cuda_gemv, triton_layouts

    copies: dict[int, tuple] = {}  # id(qt) -> (qt, its host copy): the layout is keyed to the host copy

    def held(tile: tuple[int, int], x: torch.Tensor, qt, w16) -> torch.Tensor:  # noqa: ANN001, ARG001
        if id(qt) not in copies:  # hold builds the layout on the GPU; qt itself is left as it is
            copies[id(qt)] = (qt, next(iter(cuda_gemv.hold(fmt, qt, cuda_gemv.plan(fmt, qt.shape)).values())))
        layout, _ = cuda_gemv.held(copies[id(qt)][1])
        triton_layouts.TILE = tile
        return F.linear(x, dispatch.dequantize_layout(fmt, qt, layout, 0, qt.shape[0], x.dtype))

    p = cuda_gemv.plan(fmt, (4096, 4096))
    if p is None or not cuda_gemv.needs_layout(p):
        return {}
    return {f"held {r}x{c}": partial(held, (r, c)) for r, c in tiles}


def paths(name: str, held_tiles: list[tuple[int, int]]) -> dict:
    """The ways to compute x W^T for ``name``: path -> fn(x, qt, w16)."""
    fmt = get_format(name)
    out = {"lowbit": lambda x, qt, w16: dispatch.dequant_matmul(x, fmt, qt),
           "dense": lambda x, qt, w16: dispatch.dense_matmul(x, fmt, qt),
           "reference": lambda x, qt, w16: F.linear(x, fmt.dequantize(qt).to(x.dtype)),
           "fp16": lambda x, qt, w16: F.linear(x, w16)}
    if isinstance(fmt, UniformFormat):
        from lowbit.kernels import triton_uniform

        def tiles(x: torch.Tensor, qt, w16) -> torch.Tensor:  # noqa: ANN001
            return triton_uniform.dequant_matmul(x, qt.data["codes"], qt.data["scale"], qt.data.get("min"),
                                                 decode_lut(fmt, x.device),
                                                 fmt.bits, fmt.group_cols(qt.shape[1]), qt.shape[1])
        out["tiles"] = tiles
    return out | held_paths(fmt, held_tiles)


def time_format(name: str, rows: list[int], g: torch.Generator, held_tiles: list[tuple[int, int]]) -> list[dict]:
    import triton.testing

    results = []
    for shape in LARGE:
        qt = packed_weight(name, shape, g)
        w16 = get_format(name).dequantize(qt).half()
        for m in rows:
            x = torch.randn(m, shape[1], device="cuda", dtype=torch.float16, generator=g) * 0.5
            row = {"format": name, "shape": list(shape), "m": m, "route": dispatch.route(x, get_format(name), shape)}
            want = F.linear(x.float(), w16.float())
            for path, fn in paths(name, held_tiles).items():
                y = fn(x, qt, w16)
                err = ((y.float() - want).norm() / want.norm()).item()
                if err > 1e-2:
                    raise AssertionError(f"{name} {shape} M={m} {path}: relative error {err:.2e}")
                row[path] = 1e3 * triton.testing.do_bench(partial(fn, x, qt, w16), warmup=10, rep=50,
                                                          return_mode="median")
            results.append(row)
    return results


def table(results: list[dict], m: int) -> str:
    """Markdown: per format, µs summed over the shapes for each path, and each over fp16's."""
    lines = [f"M = {m} (µs, sum of the five large shapes; x fp16)", "",
             "| format | lowbit path | " + " | ".join(PATHS) + " |", "|---|---|" + "---|" * len(PATHS)]
    for name in dict.fromkeys(r["format"] for r in results):
        rows = [r for r in results if r["format"] == name and r["m"] == m]
        fp16 = sum(r["fp16"] for r in rows)
        cells = []
        for path in PATHS:
            if all(path in r for r in rows):
                total = sum(r[path] for r in rows)
                cells.append(f"{total:.0f} ({total / fp16:.2f}x)")
            else:
                cells.append("")
        route = "/".join(sorted({r["route"] for r in rows}))
        lines.append(f"| {name} | {route} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="q4_k,q6_k,e8p_ch,iq2_xxs,q4_0,nz2_ch,int3_g128_sym")
    ap.add_argument("--rows", default="64,512,2048", help="M values, comma-separated")
    ap.add_argument("--tag", default="gpu")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/prompt-<tag>.json)")
    ap.add_argument("--held-tiles", default="16x128",
                    help="tiles (rows x columns, comma-separated) of the held path's layout dequantize to time")
    args = ap.parse_args()
    held_tiles = [tuple(int(v) for v in t.split("x")) for t in args.held_tiles.split(",")]
    PATHS.extend(f"held {r}x{c}" for r, c in held_tiles)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    rows = [int(m) for m in args.rows.split(",")]
    g = torch.Generator(device="cuda").manual_seed(0)
    start = time.time()
    results = [r for name in args.formats.split(",") for r in time_format(name, rows, g, held_tiles)]
    tables = [table(results, m) for m in rows]
    print("\n\n".join(tables))
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "command": " ".join(sys.argv),
            "gpu_unverified": sorted(verified.GPU_UNVERIFIED), "seconds": time.time() - start}
    out = Path(args.out) if args.out else HERE / "results" / f"prompt-{args.tag}.json"
    out.write_text(json.dumps({"meta": meta, "rows": results, "tables": tables}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
