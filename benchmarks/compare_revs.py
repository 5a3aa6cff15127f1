"""Figures of versions run on one machine (benchmarks/device_run.sh with REVS), side by side: per KV backend and
shape the attention's and the KV write's us (benchmark_kv_backends.py), per backend and batch the full-cache decode
tokens/s (benchmark_decode.py), per backend the decode step's CUDA time and its kernels' (benchmark_decode.py
--profile); each version's figure beside the first version's, with its ratio to it.

    python benchmarks/compare_revs.py --runs /tmp/runs main tq4-write
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (the runs' file pattern, the fields that name a figure, the figure, its label)
FIGURES = (("kv_bench.json", ("backend", "context", "batch"), "us_per_attend", "attention us"),
           ("kv_bench.json", ("backend", "context", "batch"), "us_per_write", "KV write us"),
           ("decode_bench.json", ("backend", "batch"), "full_cache_tok_s", "decode tok/s, full caches"),
           ("profile_*.json", ("backend", "batch", "kernel"), "us_per_step", "decode profile us a step"))


def rows_of(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return data["rows"] if isinstance(data, dict) else data


def figures(runs: Path, pattern: str, keys: tuple[str, ...], figure: str) -> dict[tuple, float]:
    """{key fields' values: figure} over a version's files matching `pattern`."""
    return {tuple(r[k] for k in keys): r[figure] for path in sorted(runs.glob(pattern)) for r in rows_of(path)
            if r.get(figure) is not None}


def table(runs: Path, revs: list[str]) -> list[str]:
    lines = []
    for pattern, keys, figure, label in FIGURES:
        per_rev = [figures(runs / rev, pattern, keys, figure) for rev in revs]
        if not per_rev[0]:
            continue
        lines.append(f"{label}: {' | '.join(revs)} (ratio to {revs[0]})")
        for key, first in per_rev[0].items():
            cells = [f"{first:,.1f}"] + [f"{fig[key]:,.1f} ({fig[key] / first:.3f})" if key in fig else "-"
                                         for fig in per_rev[1:]]
            lines.append(f"  {' '.join(str(k)[:40] for k in key):<56} " + " | ".join(cells))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="the folder holding a runs folder per version")
    p.add_argument("revs", nargs="+", help="the versions, the first the reference")
    a = p.parse_args()
    missing = [rev for rev in a.revs if not (a.runs / rev).is_dir()]
    if missing:
        raise SystemExit(f"no runs of {', '.join(missing)} under {a.runs}: run device_run.sh with REVS first")
    print("\n".join(table(a.runs, a.revs)) or f"no figures under {a.runs}")


if __name__ == "__main__":
    main()
