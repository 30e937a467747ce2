"""benchmarks/nll_buckets.py's table: the buckets partition the tokens, so their contributions add up to the mean."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import nll_buckets  # noqa: E402


def test_bucket_contributions_add_up_to_the_mean_change():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1000, generator=g) * 8
    nll = ref + torch.randn(1000, generator=g) * 0.3
    rows = nll_buckets.bucket_table(ref, nll, torch.rand(1000, generator=g))[2:-1]
    shares = [float(r.split("|")[2]) for r in rows]
    contributions = [float(r.split("|")[4]) for r in rows]
    assert abs(sum(shares) - 1) < 1e-2
    assert abs(sum(contributions) - float((nll - ref).mean())) < 1e-3
