"""Peer GEMV kernels side by side with lowbit's, at issue 16's shapes, timed the same way in the same run.

    pip install gemlite torchao                                        # on the GPU machine
    PYTHONPATH=src python benchmarks/peers.py --tag h200 --batch 1,8

Peers: gemlite (Triton; ``A16Wn`` with 4-bit g128 and 2-bit g64 integer weights, fp16 scales and zeros) and
torchao (``Int4WeightOnlyConfig(group_size=128)``, tinygemm's int4 kernel, bf16 activations as it requires). Each
is timed exactly as ``benchmarks/gemv_speed.py`` times lowbit (CUDA-graph replay of many calls, weight copies cycled
so L2 never serves them) and checked against its own dequantized weights. lowbit's formats of the same family run
in the same process (``--lowbit``). A peer that does not import or refuses a shape is reported and skipped.
llama.cpp CUDA is not run here: ``benchmarks/llamacpp_cuda.py`` builds it on the machine and runs its own
``test-backend-ops perf -o MUL_MAT`` and ``llama-bench``. Writes ``benchmarks/results/kernels-peers-<tag>.json``
in the kernels schema, so the results pages show it beside ``gemv_speed.py``'s files.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gemv_speed import SHAPES, bench, copies, device_bandwidth, fp16_ms, one, summarize  # noqa: E402

# (label, bits, group): the weight-only integer formats the peers run
GEMLITE = [("gemlite W4 g128", 4, 128), ("gemlite W2 g64", 2, 64)]
TORCHAO = [("torchao int4 g128", 4, 128)]


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _random_int_weight(shape: tuple[int, int], bits: int, group: int, g: torch.Generator):  # noqa: ANN202
    n, k = shape
    w_q = torch.randint(0, 1 << bits, (n, k), device="cuda", dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, k // group, device="cuda", generator=g) * 0.002 + 0.001).half()
    zeros = torch.full((n, k // group), float(1 << (bits - 1)), device="cuda", dtype=torch.float16)
    return w_q, scales, zeros


def gemlite_layers(shape: tuple[int, int], bits: int, group: int, n: int) -> tuple[list, torch.Tensor]:
    """n gemlite linears of random codes, and the first one's dequantized weight (its reference)."""
    from gemlite.helper import A16Wn

    g = torch.Generator(device="cuda").manual_seed(0)
    layers, ref = [], None
    for i in range(n):
        w_q, s, z = _random_int_weight(shape, bits, group, g)
        if i == 0:
            ref = ((w_q.float().view(shape[0], -1, group) - z.float()[..., None]) * s.float()[..., None])
        layers.append(A16Wn(device="cuda", dtype=torch.float16).from_weights(w_q, s, z, bits, group))
    return layers, ref.view(shape)


def torchao_layers(shape: tuple[int, int], group: int, n: int) -> tuple[list, torch.Tensor]:
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    layers, ref = [], None
    for i in range(n):
        lin = torch.nn.Linear(shape[1], shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, std=0.02)
        try:
            quantize_(lin, Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d"))
        except TypeError:  # older torchao: tinygemm is the only packing
            quantize_(lin, Int4WeightOnlyConfig(group_size=group))
        if i == 0:  # its dequantized weight, read back through its own kernel (the tensor has no dequantize)
            eye = torch.eye(shape[1], device="cuda", dtype=torch.bfloat16)
            ref = lin(eye).float().T.contiguous()
            del eye
        layers.append(lin)
    return layers, ref


def peer_row(label: str, shape: tuple[int, int], m: int, bits: int, group: int, bw: float,
             build: Callable[[tuple[int, int], int], tuple[list, torch.Tensor]], dtype: torch.dtype,
             config: str) -> dict:
    nbytes_w = shape[0] * shape[1] * bits // 8 + 2 * 2 * shape[0] * shape[1] // group  # codes + fp16 scale, zero
    layers, ref_w = build(shape, copies(nbytes_w))
    x = torch.randn(m, shape[1], device="cuda", dtype=dtype)
    y = layers[0](x)
    ref = F.linear(x.double(), ref_w.double())
    err = float((y.double() - ref).norm() / ref.norm())
    ms = bench(lambda i: layers[i](x), len(layers))
    ms16 = fp16_ms(shape, m, x.half())
    nbytes = nbytes_w + 2 * x.numel() + 2 * m * shape[0]
    return {"config": config, "shape": list(shape), "format": label, "batch": m,
            "bpw": 8 * nbytes_w / (shape[0] * shape[1]), "ms": ms, "fp16_ms": ms16, "bytes": nbytes,
            "frac_of_copy_bw": nbytes / (ms * 1e-3) / bw, "speedup_vs_fp16": ms16 / ms, "rel_err": err}


def peers() -> list[tuple]:
    """(label, bits, group, activation dtype, package and version, builder(shape, n))."""
    out = [(label, bits, group, torch.float16, f"gemlite {_version('gemlite')}",
            lambda shape, n, b=bits, gs=group: gemlite_layers(shape, b, gs, n)) for label, bits, group in GEMLITE]
    return out + [(label, bits, group, torch.bfloat16, f"torchao {_version('torchao')}",
                   lambda shape, n, gs=group: torchao_layers(shape, gs, n)) for label, bits, group in TORCHAO]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--lowbit", default="int4_g128_sym,q4_0,int2_g64_sym,nz2_ch,e8p_ch,iq2_xxs")
    ap.add_argument("--peers", default="gemlite,torchao", help="which peers to run (package names)")
    ap.add_argument("--tag", default="gpu")
    args = ap.parse_args(argv)
    t0 = time.time()
    bw = device_bandwidth()
    if bw is None:
        return 2
    rows, skipped = [], {}
    print("| shape | format | batch | µs | fp16 µs | % of copy BW | rel err |\n|---|---|---|---|---|---|---|")
    for label, shape in SHAPES.items():
        for m in (int(b) for b in args.batch.split(",")):
            done = []
            for name, bits, group, dtype, config, build in peers():
                if name in skipped or name.split()[0] not in args.peers.split(","):
                    continue
                try:
                    done.append(peer_row(name, shape, m, bits, group, bw, build, dtype, config))
                except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                    skipped[name] = f"{type(e).__name__}: {e}"
                    print(f"skipping {name}: {skipped[name]}", flush=True)
            done += [one(shape, f, m, bw) for f in filter(None, args.lowbit.split(","))]
            for r in done:
                print(f"| {shape[0]}x{shape[1]} | {r['format']} | {m} | {r['ms'] * 1e3:.1f} | "
                      f"{r['fp16_ms'] * 1e3:.1f} | {100 * r['frac_of_copy_bw']:.0f}% | {r['rel_err']:.1e} |",
                      flush=True)
            rows += [r | {"label": label} for r in done]
        write(args, bw, rows, skipped)  # after every shape: a run cut short keeps what it measured
    for line in summarize(rows):
        print(f"  {line['format']:>18} batch {line['batch']}: mean {100 * line['mean']:.0f}% of copy BW, "
              f"{line['speedup']:.2f}x fp16")
    print(f"total {time.time() - t0:.0f} s")
    return 0


def write(args: argparse.Namespace, bw: float, rows: list[dict], skipped: dict[str, str]) -> None:
    out = Path(__file__).parent / "results" / f"kernels-peers-{args.tag}.json"
    command = (f"python benchmarks/peers.py --tag {args.tag} --batch {args.batch} --peers {args.peers} "
               f"--lowbit '{args.lowbit}'")
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "copy_bw": bw, "rows": rows,
                               "summary": summarize(rows), "skipped": skipped, "command": command}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
