"""Turn local documents into challenge-format shards with a SentencePiece model.

Documents come from JSON lines (one {"text": ...} object per line, as FineWeb's own dumps and the
Wikipedia stand-in corpus hold them) or from text files (one per line, blank-line separated, or one per
file); any input may be .xz or .gz compressed. Each document gets BOS (id 1) in front, as the challenge's
shards do. They are tokenized in parallel processes, in input order. The validation split is the tail of
the stream, whole documents only: it starts at the last document start that leaves at least
--val-tokens (or --val-fraction of the stream) behind it. A single document can only be cut inside; its
tail then gets a BOS of its own and the tool says so.

    python data/build_shards.py --input ../shared/data/wikipedia/enwiki_0*.jsonl.xz --val-tokens 2000000 \
        --out data/datasets/wikipedia_sp1024
    python data/build_shards.py --input a.txt b.txt --docs line --out data/datasets/mytext_sp1024
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import sentencepiece as spm

MAGIC, VERSION, BOS_ID = 20240520, 1, 1
DOCS_PER_TASK = 64


def open_text(path: Path):
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8")


def doc_mode(path: Path, mode: str) -> str:
    return ("jsonl" if ".jsonl" in path.suffixes else "line") if mode == "auto" else mode


def read_docs(path: Path, mode: str) -> Iterator[str]:
    mode = doc_mode(path, mode)
    with open_text(path) as f:
        if mode == "jsonl":
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not a JSON object ({e.msg}, column {e.colno}); each line "
                                     f"must be one {{\"text\": ...}} object") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{number}: no string \"text\" field; each line must be one "
                                     f"{{\"text\": ...}} object")
                yield record["text"]
            return
        text = f.read()
    if mode == "file":
        yield text
    elif mode == "blank":
        yield from (d for d in text.split("\n\n") if d.strip())
    else:
        yield from (line for line in text.splitlines() if line.strip())


def batches(inputs: list[Path], mode: str) -> Iterator[list[str]]:
    batch = []
    for path in inputs:
        for doc in read_docs(path, mode):
            batch.append(doc)
            if len(batch) == DOCS_PER_TASK:
                yield batch
                batch = []
    if batch:
        yield batch


_sp: spm.SentencePieceProcessor | None = None


def _load_tokenizer(path: str) -> None:
    global _sp
    _sp = spm.SentencePieceProcessor(model_file=path)


def _tokenize(docs: list[str]) -> list[np.ndarray]:
    return [np.concatenate(([BOS_ID], ids)).astype(np.int64) for ids in _sp.encode(docs)]


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


def validation_start(doc_starts: np.ndarray, total: int, val_tokens: int) -> int:
    """The last document start with at least val_tokens after it; 0 only if the first document is that start."""
    if not 0 < val_tokens < total:
        raise ValueError(f"the validation split must hold between 1 and {total - 1} of the stream's {total} tokens, "
                         f"not {val_tokens}")
    return int(doc_starts[np.searchsorted(doc_starts, total - val_tokens, side="right") - 1])


def build(inputs: list[Path], mode: str, tokenizer: Path, out: Path, val_fraction: float | None,
          shard_tokens: int, val_tokens: int | None = None, workers: int = 1, log=print) -> dict:
    for path in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"input {path} does not exist")
    docs: list[np.ndarray] = []
    if workers > 1:
        with Pool(workers, initializer=_load_tokenizer, initargs=(str(tokenizer),)) as pool:
            for part in pool.imap(_tokenize, batches(inputs, mode)):
                docs.extend(part)
    else:
        _load_tokenizer(str(tokenizer))
        for batch in batches(inputs, mode):
            docs.extend(_tokenize(batch))
    if not docs:
        raise ValueError(f"no documents in {', '.join(map(str, inputs))}")
    tokens = np.concatenate(docs)
    doc_starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    wanted = val_tokens if val_tokens is not None else int(len(tokens) * val_fraction)
    cut = validation_start(doc_starts, len(tokens), wanted)
    if cut > 0:
        train, val = tokens[:cut], tokens[cut:]
    else:  # one document: cut inside it, the tail starting with a BOS of its own
        cut = len(tokens) - wanted
        train, val = tokens[:cut], np.concatenate(([BOS_ID], tokens[cut:]))
        log(f"note: the first document spans the split point, so validation starts inside it (token {cut})")
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("fineweb_train_*.bin")) + list(out.glob("fineweb_val_*.bin")):
        stale.unlink()  # a shard left from an earlier build would join this one's stream
    for i in range(0, len(train), shard_tokens):
        write_shard(out / f"fineweb_train_{i // shard_tokens:06d}.bin", train[i:i + shard_tokens])
    write_shard(out / "fineweb_val_000000.bin", val)
    return {"documents": len(docs), "train_tokens": int(len(train)), "val_tokens": int(len(val)),
            "val_documents": int(len(docs) - np.searchsorted(doc_starts, cut))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", type=Path, required=True)
    p.add_argument("--docs", choices=("auto", "jsonl", "line", "blank", "file"), default="auto",
                   help="document boundaries: JSON lines, one per line, blank-line separated, or one per file "
                        "(auto: jsonl for *.jsonl[.xz|.gz], else line)")
    p.add_argument("--tokenizer", type=Path, default=Path(__file__).parent / "tokenizers" / "fineweb_1024_bpe.model")
    p.add_argument("--out", type=Path, required=True)
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, help="the validation tail's share of the stream (default 0.15)")
    split.add_argument("--val-tokens", type=int, help="the validation tail's tokens (at least; whole documents)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    a = p.parse_args()
    if a.val_tokens is None and a.val_fraction is None:
        a.val_fraction = 0.15
    if a.val_fraction is not None and not 0.0 < a.val_fraction < 1.0:
        p.error("--val-fraction must be in (0, 1)")
    if a.workers < 1 or a.shard_tokens < 1:
        p.error("--workers and --shard-tokens must be positive")
    try:
        stats = build(a.input, a.docs, a.tokenizer, a.out, a.val_fraction, a.shard_tokens, a.val_tokens, a.workers)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"build_shards: {e}") from None
    print(f"wrote {a.out}: documents:{stats['documents']} train_tokens:{stats['train_tokens']} "
          f"val_tokens:{stats['val_tokens']} val_documents:{stats['val_documents']}")


if __name__ == "__main__":
    main()
