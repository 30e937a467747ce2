import copy

import pytest
import torch

from conftest import make_model
from lowbit.algorithms.mixed import (
    choose_formats,
    layer_bytes,
    layer_sensitivity,
    mixed_plan,
    parse_mix,
    top_layers,
)
from lowbit.algorithms.sequential import CalibConfig
from lowbit.api import quantize
from lowbit.errors import LowbitError
from lowbit.eval.sizes import model_size
from lowbit.models.quant_linear import QuantLinear
from lowbit.models.walker import decoder_linears
from lowbit.recipe import Recipe


def brute_force(costs, losses, budget):
    import itertools

    best = None
    for choice in itertools.product(*[range(len(r)) for r in costs]):
        c = sum(costs[i][j] for i, j in enumerate(choice))
        v = sum(losses[i][j] for i, j in enumerate(choice))
        if c <= budget and (best is None or v < best[0] - 1e-12):
            best = (v, choice)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 6, 3
    costs = (torch.randint(10, 100, (n, k), generator=g).sort(dim=1).values * 100).tolist()
    losses = torch.rand(n, k, generator=g).sort(dim=1, descending=True).values.tolist()
    budget = int(sum(r[0] for r in costs) * 1.6)
    choice = choose_formats(costs, losses, budget)
    assert sum(costs[i][j] for i, j in enumerate(choice)) <= budget
    got = sum(losses[i][j] for i, j in enumerate(choice))
    assert got == pytest.approx(brute_force(costs, losses, budget)[0])


def test_knapsack_impossible_budget():
    with pytest.raises(LowbitError, match="below the smallest"):
        choose_formats([[100, 200]], [[1.0, 0.0]], 50)


def test_top_layers_picks_largest_gains():
    losses = [[5.0, 1.0], [2.0, 1.9], [9.0, 0.5], [1.0, 0.9]]
    assert top_layers(losses, 2) == [1, 0, 1, 0]
    with pytest.raises(LowbitError):
        top_layers(losses, 5)


@pytest.mark.parametrize("bad", ["int2_g32_sym@3L", "int2_g32_sym/int4_g32_sym", "a/b@1L",
                                 "int2_g32_sym/int3_g32_sym/int4_g32_sym@2L", "int2_g32_sym/int4_g32_sym@2GB"])
def test_bad_mix_specs(bad):
    with pytest.raises(LowbitError):
        parse_mix(bad)


def test_sensitivity_restores_model_and_is_monotone(tiny_tokenizer, text_file):
    from lowbit.calibration.samples import calibration_samples

    model = make_model("llama", vocab=len(tiny_tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = calibration_samples(tiny_tokenizer, 4, 32, text_path=text_file)
    sens = layer_sensitivity(model, samples, ("int2_g32_sym", "int8_g32_sym"), progress=False)
    assert len(sens) == 2
    assert all(row[0] > row[1] for row in sens)  # 2-bit hurts more than 8-bit in every layer
    assert not any(isinstance(m, QuantLinear) for m in decoder_linears(model).values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bpw_budget_is_honoured_by_true_size(arch, tiny_tokenizer, text_file):
    model = make_model(arch, vocab=len(tiny_tokenizer))
    mp = mixed_plan(model, tiny_tokenizer, "int2_g32_sym/int4_g32_sym/int8_g32_sym@4.2bpw", seqlen=32,
                    nsamples=4, text_path=text_file, progress=False)
    assert set(mp.plan) == set(decoder_linears(model))
    assert len(set(mp.layer_formats)) >= 2  # the budget forces a real mix (2.5 / 4.5 / 8.5 bpw options)
    quantize(model, Recipe("int2_g32_sym/int4_g32_sym/int8_g32_sym@4.2bpw", calib=CalibConfig(seqlen=32,
             text_path=text_file)), tiny_tokenizer, progress=False)
    n_weights = sum(m.in_features * m.out_features for m in decoder_linears(model).values())
    weight_bytes = sum(m.quantized().nbytes for m in decoder_linears(model).values())
    assert 8 * weight_bytes / n_weights <= 4.2
    assert weight_bytes == mp.estimated_linear_bytes


def test_mb_budget_and_layer_count(tiny_tokenizer, text_file):
    model = make_model("llama", vocab=len(tiny_tokenizer))
    fixed = model_size(model)
    lin16 = fixed.linear_bytes
    budget_mb = (fixed.total_bytes - lin16 + lin16 * 3.5 / 16) / 1e6
    m = copy.deepcopy(model)
    mp = mixed_plan(m, tiny_tokenizer, f"int2_g32_sym/int4_g32_sym@{budget_mb:.6f}MB", seqlen=32, nsamples=4,
                    text_path=text_file, progress=False)
    costs = layer_bytes(model, ("int2_g32_sym", "int4_g32_sym"))
    assert mp.estimated_linear_bytes <= lin16 * 3.5 / 16 + 1
    assert mp.estimated_linear_bytes > sum(c[0] for c in costs)  # uses the room it has
    one = mixed_plan(model, tiny_tokenizer, "int2_g32_sym/int4_g32_sym@1L", seqlen=32, nsamples=4,
                     text_path=text_file, progress=False)
    assert one.layer_formats.count("int4_g32_sym") == 1


def test_mixed_plan_through_gptq_pipeline(tiny_tokenizer, text_file):
    model = make_model("llama", vocab=len(tiny_tokenizer))
    stats = quantize(model, Recipe("int2_g32_sym/int4_g32_sym@1L", "gptq", rotate=True,
                                   calib=CalibConfig(nsamples=4, seqlen=32, text_path=text_file)),
                     tiny_tokenizer, progress=False).linears
    formats = [m.format_name for m in decoder_linears(model).values()]
    assert len(stats) == len(formats)
    assert sorted(set(formats)) == ["int2_g32_sym", "int4_g32_sym"]
    assert all(m.rotation is not None for m in decoder_linears(model).values())
