"""GPTQ cost per decoder layer at a real model's shapes (random weights), through the CLI's layer-by-layer pipeline.

    python benchmarks/gptq_layer.py --device cuda [--format int3_g128_asym] [--nsamples 128] [--seqlen 2048]
    python benchmarks/gptq_layer.py --shape smollm2-135m --layers 30 --nsamples 32 --seqlen 512 \\
        --format int4_g64_sym --device cpu [--act-order] [--rtn-baseline] [--threads 2] [--omp-default]
    python benchmarks/gptq_layer.py --matrices 2048x2048,8192x2048 --format int4_g64_sym,q4_0,q4_k,iq2_xxs \\
        --device cpu [--threads 1]

``--shape``: ``llama-2-7b`` (default; hidden 4096, MLP 11008, 32 heads) or ``smollm2-135m`` (the bundled model's
shapes: hidden 576, MLP 1536, 9 heads, 3 KV heads); ``--model DIR`` takes a real HF directory instead (its first
``--layers`` layers). Feeds random token ids (so the calibration activations are random embeddings) and runs
``quantize_sequential`` as ``lowbit quantize --method gptq`` does. Prints seconds in all, per layer (layers after
the first; the first also captures the inputs), GPTQ seconds per linear of the first layer, peak memory. CPU threads
are set as the ``lowbit`` CLI sets them (:func:`lowbit.cpu.configure`: idle OpenMP threads sleep, one thread per
available CPU or ``--threads``); ``--omp-default`` leaves PyTorch's own settings.

``--matrices``: instead, ``gptq_quantize`` alone on random matrices of those shapes ([rows, cols]) against the
Hessian of 4096 correlated random inputs, for each ``--format`` (comma-separated), in natural and act-order (scalar
formats), best of ``--repeat``; with the RTN baseline's seconds (one ``quantize`` + proxy loss), which
``lowbit`` no longer computes by default.

Before/after: the script only uses the public pipeline, so the same command run against an older tree times the
older code: ``git archive <commit> src | tar -x -C /tmp/old && PYTHONPATH=/tmp/old/src python
benchmarks/gptq_layer.py ...`` (older trees always measure the RTN baseline: pass ``--rtn-baseline`` for equal work,
or compare with lowbit's default, which skips it).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

SHAPES = {"llama-2-7b": (4096, 11008, 32, 32), "smollm2-135m": (576, 1536, 9, 3)}


def build_model(args: argparse.Namespace):  # noqa: ANN201 - a transformers causal LM
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = len(model.model.layers)
        return model
    hidden, inter, heads, kv = SHAPES[args.shape]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden or hidden, intermediate_size=args.intermediate or inter,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=kv,
                      vocab_size=1024, max_position_embeddings=args.seqlen)
    return LlamaForCausalLM(cfg).eval()  # stays on the CPU: only the layer being quantized moves


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--format", default="int3_g128_asym")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    ap.add_argument("--model", default=None, help="a real HF directory instead of random weights")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--intermediate", type=int, default=None)
    ap.add_argument("--rtn-baseline", action="store_true", help="also measure each linear's RTN proxy loss")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as the CLI sets them)")
    ap.add_argument("--omp-default", action="store_true", help="leave PyTorch's thread settings alone")
    ap.add_argument("--matrices", default=None, help="time gptq_quantize alone on these RxC shapes")
    ap.add_argument("--repeat", type=int, default=3, help="--matrices: best of this many runs")
    args = ap.parse_args(argv)
    try:
        from lowbit.cpu import configure
    except ImportError:  # an older tree: its CLI set nothing
        configure = None
    if configure and not args.omp_default:
        configure(args.threads)  # before torch loads, as the CLI does
    import torch

    from lowbit.algorithms.plans import uniform_plan
    from lowbit.algorithms.sequential import CalibConfig, GPTQConfig, quantize_sequential

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.matrices:
        return matrices(args)

    model = build_model(args)
    vocab = model.config.vocab_size
    samples = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    newer = "rtn_baseline" in GPTQConfig.__dataclass_fields__  # older trees always measure the RTN baseline
    gptq = GPTQConfig(rtn_baseline=True) if args.rtn_baseline and newer else GPTQConfig()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    done: list[tuple[float, float]] = []  # (wall, CPU seconds of all threads) when each layer finished
    t0, c0 = time.perf_counter(), time.process_time()
    report = quantize_sequential(model, None, uniform_plan(model, args.format), calib=CalibConfig(), gptq=gptq,
                                 device=args.device, samples=samples, progress=False,
                                 rounding="gptq_act" if args.act_order else "gptq",
                                 on_layer_done=lambda _i: done.append((time.perf_counter(), time.process_time())))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    total, cpu_total = time.perf_counter() - t0, time.process_time() - c0
    per_layer = [b[0] - a[0] for a, b in zip(done, done[1:], strict=False)]
    cpu_layer = [b[1] - a[1] for a, b in zip(done, done[1:], strict=False)]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        f"cpu ({platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, " \
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})"
    print(f"`python benchmarks/gptq_layer.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    cfg = model.config
    print(f"shape: {args.model or args.shape} (hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}), "
          f"{len(done)} layers; {args.nsamples} x {args.seqlen} calibration tokens; format {args.format}; "
          f"act-order {args.act_order}; torch {torch.__version__}; device {device}")
    print(f"total: {total:.2f} s (capture of layer inputs, Hessians, GPTQ, quantized forward, every layer); "
          f"CPU time {cpu_total:.2f} s")
    if per_layer:  # CPU time (all threads) is the steadier figure on a shared machine, with idle threads asleep
        print(f"per layer: {statistics.median(per_layer):.2f} s median of layers 1..{len(done) - 1} "
              f"(min {min(per_layer):.2f}, max {max(per_layer):.2f}); CPU time {statistics.median(cpu_layer):.2f} s")
    first = {n: s for n, s in report.linears.items() if ".layers.0." in n}
    for name, s in first.items():
        rtn = "" if s.rtn_proxy_loss is None else \
            f" (rtn {s.rtn_proxy_loss:.4g}, ratio {s.proxy_loss / s.rtn_proxy_loss:.3f})"
        print(f"  {name.split('layers.0.')[1]:<22} gptq {s.seconds:6.2f} s   proxy loss {s.proxy_loss:.4g}{rtn}")
    print(f"  sum of GPTQ seconds, layer 0: {sum(s.seconds for s in first.values()):.2f}; all layers: "
          f"{sum(s.seconds for s in report.linears.values()):.2f}")
    print(f"peak host memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 0


def matrices(args: argparse.Namespace) -> int:
    import torch

    from lowbit.algorithms.gptq import gptq_quantize, proxy_loss
    from lowbit.formats import get_format

    def best(fn) -> float:  # noqa: ANN001
        times = []
        for _ in range(args.repeat):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times)

    print(f"`python benchmarks/gptq_layer.py {' '.join(sys.argv[1:])}`")
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} torch threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; seconds, best of {args.repeat}")
    print("| shape | format | order | gptq_quantize | RTN baseline | proxy loss |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for shape in args.matrices.split(","):
        rows, cols = (int(x) for x in shape.lower().split("x"))
        mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
        x = torch.randn(4096, cols, generator=g) @ mix
        H = (2.0 / 4096 * x.t() @ x).to(args.device)
        w = (torch.randn(rows, cols, generator=g) * 0.02).to(args.device)
        for name in args.format.split(","):
            fmt = get_format(name)
            rtn = best(lambda: proxy_loss(w, fmt.dequantize(fmt.quantize(w)), H))  # noqa: B023
            for act in (False, True) if fmt.vector_dim == 1 else (False,):
                res = []
                secs = best(lambda: res.append(gptq_quantize(w, H, fmt, act_order=act)))  # noqa: B023
                print(f"| {rows}x{cols} | {name} | {'act-order' if act else 'natural'} | {secs:.2f} | {rtn:.2f} "
                      f"| {res[-1].proxy_loss:.5g} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
