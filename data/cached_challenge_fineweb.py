"""Download the challenge's FineWeb shards and tokenizer from the Hugging Face dataset
willdepueoai/parameter-golf (manifest-driven), then verify every shard's size and header so a
0-byte or truncated download is reported instead of trained on.

    python data/cached_challenge_fineweb.py --train-shards 10      # sp1024 val + 10 train shards
    python data/cached_challenge_fineweb.py --verify-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

REPO_ID = os.environ.get("MATCHED_FINEWEB_REPO_ID", "willdepueoai/parameter-golf")
REMOTE_ROOT = "datasets"
HERE = Path(__file__).resolve().parent
MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 1024


def local_path(remote: str) -> Path:
    parts = Path(remote).parts
    if parts[:1] == (REMOTE_ROOT,):
        parts = parts[1:]
    return HERE.joinpath(*parts)


def download(remote: str) -> Path:
    dest = local_path(remote)
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    from huggingface_hub import hf_hub_download

    r = Path(remote)
    cached = Path(hf_hub_download(repo_id=REPO_ID, filename=r.name, subfolder=r.parent.as_posix(), repo_type="dataset"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(cached.resolve(strict=True), tmp)
    os.replace(tmp, dest)
    return dest


def verify_shard(path: Path) -> str | None:
    """None when the shard is whole, else what is wrong with it."""
    size = path.stat().st_size if path.exists() else -1
    if size < HEADER_BYTES:
        return f"{path}: {max(size, 0)} bytes, shorter than the header (missing, empty or truncated)"
    header = np.fromfile(path, dtype="<i4", count=3)
    if int(header[0]) != MAGIC or int(header[1]) != VERSION:
        return f"{path}: bad header magic/version {int(header[0])}/{int(header[1])}"
    if size != HEADER_BYTES + 2 * int(header[2]):
        return f"{path}: {size} bytes, header promises {HEADER_BYTES + 2 * int(header[2])} (truncated)"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-shards", type=int, default=80)
    p.add_argument("--variant", default="sp1024")
    p.add_argument("--verify-only", action="store_true", help="check the shards already on disk; download nothing")
    a = p.parse_args()
    if a.train_shards < 0:
        p.error("--train-shards must be >= 0")
    name = f"fineweb10B_{a.variant}"
    if a.verify_only:
        shards = sorted((HERE / "datasets" / name).glob("fineweb_*.bin"))
    else:
        manifest = json.loads(download(f"{REMOTE_ROOT}/manifest.json").read_text())
        entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
        if entry is None:
            sys.exit(f"dataset {name} is not in the manifest; known: {[d.get('name') for d in manifest.get('datasets', [])]}")
        stats = entry.get("stats") or {}
        if a.train_shards > int(stats["files_train"]):
            sys.exit(f"{name} has {stats['files_train']} train shards; asked for {a.train_shards}")
        prefix = f"{REMOTE_ROOT}/datasets/{name}"
        shards = [download(f"{prefix}/fineweb_val_{i:06d}.bin") for i in range(int(stats["files_val"]))]
        shards += [download(f"{prefix}/fineweb_train_{i:06d}.bin") for i in range(a.train_shards)]
        tok = next(t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name"))
        for key in ("model_path", "vocab_path", "path"):
            if tok.get(key):
                download(f"{REMOTE_ROOT}/{tok[key]}")
    problems = [msg for msg in map(verify_shard, shards) if msg]
    for msg in problems:
        print(f"BAD SHARD {msg}: delete it and run this script again", file=sys.stderr)
    print(f"{len(shards) - len(problems)}/{len(shards)} shards verified in {HERE / 'datasets' / name}")
    sys.exit(1 if problems or not shards else 0)


if __name__ == "__main__":
    main()
