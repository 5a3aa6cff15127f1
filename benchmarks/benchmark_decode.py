"""Autoregressive decode throughput of a trained artifact per KV backend and batch size
(validation windows tiled to fill the largest batch), through the same driver as the final eval.

    python benchmarks/benchmark_decode.py final_model.polar.ptz --data-path DIR --batches 1,64,256,512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact", type=Path)
    p.add_argument("--data-path", required=True)
    p.add_argument("--tokenizer", default="data/tokenizers/fineweb_1024_bpe.model")
    p.add_argument("--backends", default="bf16,int8_triton,qjl_triton")
    p.add_argument("--batches", default="1,64,256,512")
    p.add_argument("--batch1-windows", type=int, default=4, help="windows decoded at batch 1")
    p.add_argument("--out", type=Path, default=Path("decode_bench.json"))
    a = p.parse_args()
    device = torch.device("cuda")
    state, meta = tg.load_artifact(a.artifact)
    model = tg.build_model(meta["model"], device)
    model.load_state_dict(state)
    model.eval()
    args = dataclasses.replace(tg.Hyperparameters(), **meta["model"], data_path=a.data_path, tokenizer_path=a.tokenizer)
    val = tg.load_validation_tokens(args)
    luts = tg.ByteLUTs.build(tg.load_tokenizer(args), device)
    rows = []
    for backend in a.backends.split(","):
        for batch in map(int, a.batches.split(",")):
            windows = a.batch1_windows if batch == 1 else batch
            reps = -(-windows * args.train_seq_len // (val.numel() - 1)) + 1
            tokens = val[:-1].repeat(reps)[:windows * args.train_seq_len + 1]
            r = tg.autoregressive_eval(args, model, tokens, luts, backend, device, print, batch=batch)
            rows.append(r)
            print(f"{backend:<12} batch {batch:>4}: {r['tok_s']:>10.0f} tok/s  val_bpb {r['val_bpb']:.4f}  "
                  f"peak {r['peak_mem_mib']:.0f} MiB  bytes/token {r['bytes_per_token']}")
    a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
