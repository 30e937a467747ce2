"""llm-compressor's GPTQ at lowbit's CPU benchmark settings, for a side-by-side time: int4, groups of 64, symmetric,
32 x 512 random-token calibration windows (seed 0), static act-order (llm-compressor's default, as lowbit's
``gptq_act``), damping 0.01, blocks of 128.

    python -m venv /tmp/lc && /tmp/lc/bin/pip install llmcompressor==0.14.0   # its own environment: it pins
    /tmp/lc/bin/python benchmarks/gptq_llmcompressor.py MODEL_DIR [--layers 30] [--threads 1]    # transformers<=5.17

Compare with ``python benchmarks/gptq_layer.py --model MODEL_DIR --layers 30 --nsamples 32 --seqlen 512
--format int4_g64_sym --act-order --device cpu``. Prints the seconds of ``oneshot`` (calibration, GPTQ and
propagation through every layer) and the peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--layers", type=int, default=None, help="only the first N decoder layers")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))  # benchmarks/gemv_speed.py would pass for the `kernels` package
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]

    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.layers:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = len(model.model.layers)
    ids = torch.randint(0, model.config.vocab_size, (32, 512), generator=torch.Generator().manual_seed(0))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
    recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], block_size=128, dampening_frac=0.01)
    t = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=512, num_calibration_samples=32,
            pipeline="sequential")
    dt = time.perf_counter() - t
    n = model.config.num_hidden_layers
    print(f"llm-compressor oneshot GPTQ: {dt:.2f} s for {n} layers ({dt / n:.2f} s/layer); "
          f"{torch.get_num_threads()} torch threads; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
