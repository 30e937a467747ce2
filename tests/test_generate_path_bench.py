"""benchmarks/generate_path.py on a tiny model on the CPU: both paths per quantized variant, one for fp16, the
same greedy tokens either way (the weight cache holds the very weights the packed path decodes on a CPU)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import generate_path  # noqa: E402


def test_each_quantized_variant_runs_with_and_without_the_cache(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    assert generate_path.main(["--device", "cpu", "--layers", "2", "--hidden", "256", "--intermediate", "512",
                               "--heads", "4", "--vocab", "1000", "--prompt", "8", "--gen", "6", "--repeats", "1",
                               "--formats", "fp16,q4_0", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fp16", "q4_0"]
    fp16, q4 = rows
    assert set(fp16) == {"variant", "packed"} and q4["same_tokens"] is True
    assert q4["cache"]["weight_cache_mb"] > 0 and q4["packed"]["weight_cache_mb"] == 0
    for r in (fp16["packed"], q4["cache"], q4["packed"]):
        assert len(r["tokens"]) == 6 and r["decode_tok_s"] > 0 and r["first_token_ms"] > 0
