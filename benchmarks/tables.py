"""Merge benchmarks/results/quality-*.json into one side-by-side table: one row per format, one column per method.

    python benchmarks/tables.py [benchmarks/results/quality-h100-rtn.json benchmarks/results/quality-h100-gptq.json]

The table is ``lowbit.eval.results_docs.side_by_side``, the one docs/results/quality.md opens with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lowbit.eval.results_docs import side_by_side


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or sorted((Path(__file__).parent / "results").glob("quality-*.json"))
    print(side_by_side(r for f in files for r in json.loads(f.read_text())["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
