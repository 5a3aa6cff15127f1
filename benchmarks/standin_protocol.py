"""The stand-in protocol: a named configuration trained on one GPU on the Wikipedia stand-in corpus, exported,
reloaded and rescored, then one row appended to the results table (benchmarks/standin_results.md).

Shards come from the corpus's four JSON-lines files (built once into --data, tokenized in parallel); the
validation split is their last 2,000,000 tokens, whole articles. Every configuration trains for --seconds
of wallclock at the challenge's batch (524,288 tokens/step) and sequence length; the final evals run as
the trainer runs them. Rank codecs and configurations by these rows only, never by runs on the small texts.

    python benchmarks/standin_protocol.py --config int8 polar43334 --corpus .device/wikipedia \
        --set NUM_LAYERS=11 --results benchmarks/standin_results.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

QAT = {"int": lambda bits, rot="0": {"QAT_SCHEME": "int", "WEIGHT_QUANT_SCHEME": "int", "INT_BITS": bits, "INT_ROTATE": rot},
       "polar": lambda bits, embed="5,4,4,4,5": {"QAT_SCHEME": "polar", "WEIGHT_QUANT_SCHEME": "polar",
                                                 "POLAR_BITS": bits, "POLAR_EMBED_BITS": embed}}
CONFIGS = {
    "int8": {},  # the baseline's export, no QAT
    "int8qat": {"QAT_SCHEME": "int8"},
    **{f"int{k}{'r' if rot == '1' else ''}": QAT["int"](str(k), rot) for k in (4, 5, 6) for rot in ("0", "1")},
    "polar43334": QAT["polar"]("4,3,3,3,4"),
    "polar33334": QAT["polar"]("3,3,3,3,4"),
    "polar32223": QAT["polar"]("3,2,2,2,3"),
    "polar54445": QAT["polar"]("5,4,4,4,5"),
}
HEADER = """# Stand-in protocol results

Rows appended by `benchmarks/standin_protocol.py`: one configuration each, one GPU, the Wikipedia stand-in
corpus (`../shared/data/wikipedia`; validation = its last 2,000,000 tokens, whole articles), training for the
wallclock shown at 524,288 tokens/step. val_bpb pre: before export; roundtrip: the artifact reloaded and
rescored. bits/w: the artifact's bytes x 8 per parameter, under zlib (as shipped) and lzma (the payload
recompressed). Compare rows with each other, not with FineWeb scores.

| date | commit | device | config | settings | wallclock | steps | step_avg | val_bpb pre | val_bpb roundtrip | model bytes | total bytes | bits/w zlib | bits/w lzma |
| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
"""


def build_shards(corpus: Path, data: Path, val_tokens: int) -> None:
    if (data / "fineweb_val_000000.bin").is_file() and list(data.glob("fineweb_train_*.bin")):
        return
    inputs = sorted(corpus.glob("enwiki_*.jsonl.xz"))
    if len(inputs) != 4:
        raise SystemExit(f"{corpus} holds {len(inputs)} enwiki_*.jsonl.xz files, not the stand-in's 4: pass --corpus")
    subprocess.run([sys.executable, str(ROOT / "data" / "build_shards.py"), "--input", *map(str, inputs),
                    "--val-tokens", str(val_tokens), "--out", str(data)], check=True)


def run_config(name: str, extra: dict, a, tg) -> dict:
    settings = " ".join(f"{k}={v}" for k, v in {**CONFIGS[name], **extra}.items())
    run_id = a.run_id or name + (f"_{hashlib.sha1(settings.encode()).hexdigest()[:8]}" if extra else "")
    out = a.out_dir / run_id
    if out.exists():
        raise SystemExit(f"{out} exists from an earlier run: remove it or pass another --out-dir")
    env = {**os.environ, "DATA_PATH": str(a.data), "RUN_ID": run_id, "OUT_DIR": str(out),
           "MAX_WALLCLOCK_SECONDS": str(a.seconds), "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "100",
           "PYTHONUNBUFFERED": "1", **CONFIGS[name], **extra}
    env.setdefault("TOKENIZER_PATH", str(ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"))
    log = a.out_dir / f"{run_id}.out"
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, str(a.code_dir / "train_gpt.py")], env=env, cwd=a.code_dir, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{name}: train_gpt.py exited {rc}; see {log}")
    summary = json.loads((out / "logs" / f"{run_id}.json").read_text())
    sizes = tg.compressed_sizes(out / f"final_model.{tg.CodecSettings.parse(summary['codec'], 0).label}.ptz")
    summary["bits_per_weight_by_compressor"] = {k: 8 * v / summary["parameters"] for k, v in sizes.items()}
    summary["settings"] = settings or "defaults"
    return summary


def code_commit(code_dir: Path) -> str:
    """HEAD's short hash where code_dir's train_gpt.py is tracked, "-dirty" when tracked files differ from it (the row
    ran code no commit holds). A tree extracted by `git archive` (device_run.sh's REVS versions, staged in the
    checkout's ignored .device folder) is no checkout of its own: git stamped its commit in benchmarks/commit.txt."""
    git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, cwd=code_dir,  # noqa: E731
                                       check=False).stdout.strip()
    head = git("rev-parse", "--short", "--verify", "-q", "HEAD")
    if head and git("ls-files", "train_gpt.py"):
        return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    stamp = code_dir / "benchmarks" / "commit.txt"
    archived = stamp.read_text().strip() if stamp.is_file() else ""
    return archived if archived and "$Format" not in archived else "uncommitted"


def table_row(name: str, s: dict, device: str, commit: str) -> str:
    bits = s["bits_per_weight_by_compressor"]
    return (f"| {time.strftime('%Y-%m-%d')} | {commit} | {device} | {name} | {s['settings']} | "
            f"{s['hparams']['max_wallclock_seconds']:.0f} s | {s['steps']} | {s['step_avg_ms']:.2f} ms | "
            f"{s['pre_roundtrip_val_bpb']:.5f} | {s['roundtrip_val_bpb']:.5f} | {s['model_bytes']:,} | "
            f"{s['total_bytes']:,} | {bits['zlib']:.3f} | {bits['lzma']:.3f} |\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", required=True, choices=sorted(CONFIGS))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train_gpt.py env vars for every config")
    p.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "data" / "wikipedia")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "datasets" / "wikipedia_sp1024")
    p.add_argument("--seconds", type=float, default=240.0)
    p.add_argument("--val-tokens", type=int, default=2_000_000)
    p.add_argument("--commit", help="the code's commit for the table (default: --code-dir's HEAD, -dirty if changed)")
    p.add_argument("--code-dir", type=Path, default=ROOT, help="the train_gpt.py to run (a records folder, say)")
    p.add_argument("--run-id", help="the run's name, for one --config (default: the config's name, and with --set "
                   "a hash of the settings, which the table's settings column spells out)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "out" / "standin")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "standin_results.md")
    a = p.parse_args()
    bad = [kv for kv in a.set if "=" not in kv]
    if bad:
        p.error(f"--set takes KEY=VALUE, not {' '.join(bad)}")
    if a.run_id and len(a.config) > 1:
        p.error("--run-id names one run: pass one --config with it")
    extra = dict(kv.split("=", 1) for kv in a.set)
    # The trainer runs in --code-dir: paths given relative to the caller's directory are resolved before it starts
    a.code_dir, a.data, a.out_dir, a.corpus = (x.resolve() for x in (a.code_dir, a.data, a.out_dir, a.corpus))
    if not (a.code_dir / "train_gpt.py").is_file():
        p.error(f"--code-dir {a.code_dir} holds no train_gpt.py: pass the top level or a records folder")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    build_shards(a.corpus, a.data, a.val_tokens)
    sys.path.insert(0, str(a.code_dir))
    import train_gpt as tg
    device = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name() if "
                             "torch.cuda.is_available() else 'cpu')"], capture_output=True, text=True).stdout.strip()
    commit = a.commit or code_commit(a.code_dir)
    for name in a.config:
        summary = run_config(name, extra, a, tg)
        row = table_row(name, summary, device, commit)
        if not a.results.is_file():
            a.results.write_text(HEADER)
        with open(a.results, "a") as f:
            f.write(row)
        print(row, end="", flush=True)


if __name__ == "__main__":
    main()
