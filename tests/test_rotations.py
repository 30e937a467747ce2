import pytest
import torch

from lowbit.rotations import RandomizedHadamard, fwht, hadamard_matrix

SIZES = [1, 8, 64, 576, 1536, 12, 20, 24, 40, 43 * 4, 11008 // 64, 14336 // 128, 3 * 32]


@pytest.mark.parametrize("m", [2, 4, 12, 20, 24, 40, 44, 48, 60])
def test_hadamard_matrices(m):
    h = hadamard_matrix(m)
    assert h is not None
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.t(), m * torch.eye(m))


def test_fwht_matches_dense_sylvester():
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    dense = hadamard_matrix(64) / 8
    assert torch.allclose(fwht(x), x @ dense.t(), atol=1e-5)
    with pytest.raises(ValueError):
        fwht(torch.randn(2, 12))


def test_half_precision_transforms_in_float32_without_overflow():
    """fp16 activations of a few thousand (SmolLM2's outlier channels): the unnormalized butterflies would pass
    65504 in fp16; fwht and RandomizedHadamard work in float32 and round once."""
    x = torch.full((2, 512), 2000.0, dtype=torch.float16)
    x[1, ::3] = -1500.0
    assert torch.equal(fwht(x), fwht(x.float()).half())
    assert torch.isfinite(fwht(x)).all()
    rot = RandomizedHadamard(3 * 512, seed=0)
    x3 = torch.randn(4, 3 * 512, generator=torch.Generator().manual_seed(0)).half() * 3000
    assert torch.equal(rot.apply(x3), rot.apply(x3.float()).half())
    assert torch.equal(rot.inverse(x3), rot.inverse(x3.float()).half())


@pytest.mark.parametrize("n", SIZES)
def test_orthogonal_and_round_trip(n):
    r = RandomizedHadamard(n, seed=7)
    R = r.matrix()
    assert torch.allclose(R @ R.t(), torch.eye(n), atol=1e-4)
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(r.inverse(r.apply(x)), x, atol=1e-4)
    assert torch.allclose(r.apply(x), x @ R.t(), atol=1e-4)


@pytest.mark.parametrize("n", [576, 172, 96])
def test_linear_layer_invariance(n):
    """W x == (W R^T)(R x): rotating weights and activations together changes nothing."""
    g = torch.Generator().manual_seed(1)
    W, x = torch.randn(32, n, generator=g), torch.randn(4, n, generator=g)
    r = RandomizedHadamard(n, seed=3)
    assert torch.allclose(r.apply(x) @ r.apply(W).t(), x @ W.t(), atol=1e-3)


def test_seed_determines_transform_and_incoherence():
    a, b = RandomizedHadamard(576, seed=1), RandomizedHadamard(576, seed=1)
    assert torch.equal(a.matrix(), b.matrix())
    assert not torch.equal(a.matrix(), RandomizedHadamard(576, seed=2).matrix())
    # an outlier-heavy weight becomes Gaussian-like: max |w| / rms drops sharply
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(0))
    w[:, 5] *= 50
    ratio = lambda t: (t.abs().max() / t.pow(2).mean().sqrt()).item()  # noqa: E731
    assert ratio(a.apply(w)) < ratio(w) / 5


def test_kinds():
    assert RandomizedHadamard(576).kind.startswith("hadamard")
    assert RandomizedHadamard(43 * 8).kind.startswith("random orthogonal 43")


def test_layout_2_caps_the_dense_factor_and_old_rotations_keep_theirs():
    """11008 = 43 * 2^8: layout 1 found a Paley matrix of order 5504 (a 5504 x 5504 dense factor at run time);
    layout 2 (new rotations) takes 43 x 256. Sizes under the cap split as before; a rotation read from a file
    written before layouts existed ([seed_in, seed_out]) keeps layout 1 and so the transform it was made with."""
    from lowbit.io.validate import _seed_pair
    from lowbit.rotations.hadamard import LAYOUT, MAX_DENSE
    from lowbit.rotations.incoherence import Rotation

    old, new = RandomizedHadamard(11008, 5, layout=1), RandomizedHadamard(11008, 5, layout=2)
    assert (old.m, old.p) == (5504, 2) and (new.m, new.p) == (43, 256)
    x = torch.randn(2, 11008, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(new.inverse(new.apply(x)), x, atol=1e-4)
    for n in (576, 1536, 4096, 14336, 13824, 5120):
        assert RandomizedHadamard(n, 1, layout=1).m == RandomizedHadamard(n, 1, layout=2).m <= MAX_DENSE
    with pytest.raises(ValueError, match="layout"):
        RandomizedHadamard(64, 0, layout=4)
    r = Rotation.for_layer("model.layers.0.mlp.down_proj")
    assert r.layout == LAYOUT == 3 and Rotation.from_json(r.to_json()) == r and len(r.to_json()) == 3
    legacy = Rotation.from_json([r.seed_in, r.seed_out])
    assert legacy.layout == 1 and legacy.to_json() == [r.seed_in, r.seed_out]
    assert torch.equal(legacy.transforms(11008, 11008)[1].factor, RandomizedHadamard(11008, r.seed_in, 1).factor)
    assert _seed_pair([1, 2]) and _seed_pair([1, None, 2]) and _seed_pair([1, 2, 3])
    assert not _seed_pair([1, 2, 4]) and not _seed_pair([1])


@pytest.mark.parametrize("n,blocks", [(11008, 43), (1536, 3), (14336, 7), (2816, 11), (4096, 1)])
def test_block_diagonal_layout_is_an_fwht_per_block_with_signs(n, blocks):
    """Layout 3 where the power of two in n is at least MIN_BLOCK: no dense factor, R = (I_m kron H_p) diag(signs)
    with p that power of two: each block of p inputs is mixed only within itself, by the orthonormal FWHT, after
    the same signs as layout 2 draws; recorded in a rotation's JSON like layout 2."""
    from lowbit.rotations.hadamard import fwht
    from lowbit.rotations.incoherence import Rotation

    r = RandomizedHadamard(n, 5, layout=3)
    assert (r.m, r.p, r.dense) == (blocks, n // blocks, False) and r.p & (r.p - 1) == 0 and r.m % 2 == 1
    assert torch.equal(r.signs, RandomizedHadamard(n, 5, layout=2).signs)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = fwht((x * r.signs.double()).reshape(3, blocks, n // blocks)).reshape(3, n)
    assert torch.allclose(r.apply(x), want, atol=1e-12)
    assert torch.allclose(r.inverse(r.apply(x)), x, atol=1e-12)
    if n <= 1536:  # orthonormal, and block-diagonal: nothing outside the blocks
        m = r.matrix().double()
        assert torch.allclose(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-6)
        mask = torch.block_diag(*[torch.ones(n // blocks, n // blocks)] * blocks).bool()
        assert m[~mask].abs().max() == 0 and m[mask].abs().min() > 0
    rot = Rotation(7, None, layout=3)
    assert Rotation.from_json(rot.to_json()) == rot and rot.to_json() == [7, None, 3]


@pytest.mark.parametrize("n", [576, 448, 96, 192])
def test_block_diagonal_layout_keeps_the_dense_factor_of_small_blocks(n):
    """Below MIN_BLOCK (576 = 9 x 64 rounded worse as 9 blocks of 64 on the bundled model) layout 3 is layout 2."""
    from lowbit.rotations.hadamard import MIN_BLOCK

    a, b = RandomizedHadamard(n, 5, layout=3), RandomizedHadamard(n, 5, layout=2)
    assert (n & -n) < MIN_BLOCK and b.dense and (a.m, a.p, a.dense) == (b.m, b.p, True)
    assert torch.equal(a.matrix(), b.matrix())


def test_rotated_quant_linear_matches_its_effective_weight():
    from lowbit.formats import get_format
    from lowbit.models.quant_linear import QuantLinear
    from lowbit.rotations.incoherence import Rotation

    g = torch.Generator().manual_seed(0)
    W, b, x = torch.randn(48, 96, generator=g), torch.randn(48, generator=g), torch.randn(3, 96, generator=g)
    rot = Rotation.for_layer("layers.0.mlp.up_proj")
    assert torch.allclose(rot.unrotate_weight(rot.rotate_weight(W)), W, atol=1e-4)
    q = QuantLinear.from_quantized(get_format("int8_g32_sym").quantize(rot.rotate_weight(W)), b, rot)
    assert torch.allclose(q(x), x @ q.dequantize().t() + b, atol=1e-3)  # online rotation == effective weight
    assert (q(x) - (x @ W.t() + b)).abs().max() < 0.02 * (x @ W.t()).abs().max()  # 8 bits: near lossless


@pytest.mark.parametrize("sides", [True, "both"])
def test_rotation_helps_outlier_weights_and_survives_save_load(tmp_path, tiny_tokenizer, sides):
    """Input sides (as lowbit rotates) or both sides (as checkpoints written before carry): either way the rotation
    helps a weight with an outlier input channel and a saved checkpoint gives the same logits loaded."""
    from conftest import make_model
    from lowbit.algorithms.plans import uniform_plan
    from lowbit.algorithms.rtn import quantize_rtn
    from lowbit.io.checkpoint import load_quantized, save_quantized
    from lowbit.models.walker import decoder_linears, linear_weight
    from test_fast_decode import rtn_rotated

    base = make_model("llama", vocab=len(tiny_tokenizer))
    for m in decoder_linears(base).values():
        linear_weight(m)[:, 3] *= 30  # an outlier input channel in every weight
    plain, rotated = make_model("llama", vocab=len(tiny_tokenizer)), make_model("llama", vocab=len(tiny_tokenizer))
    plain.load_state_dict(base.state_dict())
    rotated.load_state_dict(base.state_dict())
    e_plain = quantize_rtn(plain, uniform_plan(plain, "int3_ch_sym"), progress=False)
    e_rot = rtn_rotated(rotated, "int3_ch_sym", sides)
    assert sum(e_rot.values()) < 0.7 * sum(e_plain.values())
    from lowbit.models.walker import round_to_storage

    round_to_storage(rotated)  # what is stored: norms and embeddings in float16
    save_quantized(rotated, tiny_tokenizer, tmp_path / "r")
    loaded, _ = load_quantized(tmp_path / "r")
    ids = torch.randint(0, len(tiny_tokenizer), (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, rotated(ids).logits)
    rotation = loaded.get_submodule("model.layers.1.self_attn.o_proj").rotation
    assert rotation is not None and (rotation.seed_out is None) is (sides is True)
