"""Turn local text files into challenge-format shards with a SentencePiece model.

Each document gets BOS (id 1) in front, as the challenge's shards do; the last --val-fraction of
the token stream is held out as fineweb_val_000000.bin (it starts with a BOS of its own).

    python data/build_shards.py --input a.txt b.txt --docs line --tokenizer data/tokenizers/fineweb_1024_bpe.model \
        --out data/datasets/mytext_sp1024
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import sentencepiece as spm

MAGIC, VERSION, BOS_ID = 20240520, 1, 1


def read_docs(path: Path, mode: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if mode == "file":
        return [text]
    if mode == "blank":
        return [d for d in text.split("\n\n") if d.strip()]
    return [line for line in text.splitlines() if line.strip()]


def write_shard(path: Path, tokens: np.ndarray) -> None:
    if tokens.size and int(tokens.max()) > 65535:
        raise ValueError("token ids above 65535 do not fit the uint16 shard format")
    header = np.zeros(256, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def build(inputs: list[Path], mode: str, tokenizer: Path, out: Path, val_fraction: float, shard_tokens: int) -> dict:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    stream = []
    for path in inputs:
        for ids in sp.encode(read_docs(path, mode)):
            stream.append(BOS_ID)
            stream.extend(ids)
    tokens = np.asarray(stream, dtype=np.int64)
    cut = int(len(tokens) * (1.0 - val_fraction))
    train, val = tokens[:cut], np.concatenate(([BOS_ID], tokens[cut:])) if tokens[cut] != BOS_ID else tokens[cut:]
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(train), shard_tokens):
        write_shard(out / f"fineweb_train_{i // shard_tokens:06d}.bin", train[i:i + shard_tokens])
    write_shard(out / "fineweb_val_000000.bin", val)
    return {"train_tokens": int(len(train)), "val_tokens": int(len(val))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", type=Path, required=True)
    p.add_argument("--docs", choices=("line", "blank", "file"), default="line",
                   help="document boundaries: one per line, blank-line separated, or one per file")
    p.add_argument("--tokenizer", type=Path, default=Path(__file__).parent / "tokenizers" / "fineweb_1024_bpe.model")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    a = p.parse_args()
    if not 0.0 < a.val_fraction < 1.0:
        p.error("--val-fraction must be in (0, 1)")
    stats = build(a.input, a.docs, a.tokenizer, a.out, a.val_fraction, a.shard_tokens)
    print(f"wrote {a.out}: train_tokens:{stats['train_tokens']} val_tokens:{stats['val_tokens']}")


if __name__ == "__main__":
    main()
