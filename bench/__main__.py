"""`python -m bench`: run every benchmark module's run(), print one table, merge into bench/results.json."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

# Each module has run() -> {metric: number}. Add new benchmarks here.
MODULES = ["bench.caching", "bench.loop", "bench.startup"]
RESULTS = Path(__file__).resolve().parent / "results.json"


def main() -> int:
    results: dict[str, float] = {}
    for name in MODULES:
        results.update(importlib.import_module(name).run())
    width = max([len("metric"), *map(len, results)])
    print(f"{'metric':<{width}}  {'value':>12}")
    print(f"{'-' * width}  {'-' * 12}")
    for key, value in results.items():
        print(f"{key:<{width}}  {value:>12g}")
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    RESULTS.write_text(json.dumps({**previous, **results}, indent=2, sort_keys=True) + "\n")
    print(f"written to {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
