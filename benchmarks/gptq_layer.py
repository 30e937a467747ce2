"""GPTQ cost on one 7B-shaped decoder layer (Llama-2-7B: hidden 4096, MLP 11008, 32 heads), random weights.

    python benchmarks/gptq_layer.py --device cuda [--format int3_g128_asym] [--nsamples 128] [--seqlen 2048]

Builds a one-layer Llama with random weights, feeds random token ids (so the calibration activations are random
embeddings), and runs the same layer-by-layer GPTQ pipeline the CLI uses. Prints seconds for the layer (Hessian
capture + GPTQ of its 7 linears + the quantized forward pass), GPTQ seconds per linear, and peak GPU memory.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.algorithms.plans import uniform_plan
from lowbit.algorithms.sequential import CalibConfig, GPTQConfig, quantize_sequential


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--format", default="int3_g128_asym")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=1,
                      num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 128,
                      vocab_size=1024, max_position_embeddings=args.seqlen)
    model = LlamaForCausalLM(cfg).eval()  # stays on the CPU: only the layer being quantized moves
    samples = torch.randint(0, cfg.vocab_size, (args.nsamples, args.seqlen))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = quantize_sequential(model, None, uniform_plan(model, args.format), calib=CalibConfig(),
                                 gptq=GPTQConfig(), device=args.device, samples=samples, progress=False,
                                 rounding="gptq_act" if args.act_order else "gptq")
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    print(f"`python benchmarks/gptq_layer.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(f"shape: hidden {args.hidden}, MLP {args.intermediate}; {args.nsamples} x {args.seqlen} calibration "
          f"tokens; format {args.format}; act-order {args.act_order}; device "
          f"{torch.cuda.get_device_name(0) if args.device.startswith('cuda') else 'cpu'}")
    print(f"layer total: {total:.2f} s (capture of layer inputs, Hessians, GPTQ, quantized forward)")
    for name, s in report.linears.items():
        print(f"  {name.split('layers.0.')[1]:<22} gptq {s.seconds:6.2f} s   proxy loss {s.proxy_loss:.4g} "
              f"(rtn {s.rtn_proxy_loss:.4g}, ratio {s.proxy_loss / s.rtn_proxy_loss:.3f})")
    print(f"  sum of GPTQ seconds: {sum(s.seconds for s in report.linears.values()):.2f}")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
