"""Fresh-process check of a submission artifact: with only the artifact and the code files (no
training state), rebuild the model, confirm the reload reproduces the state hash recorded at
export, score a validation slice, greedy-decode a continuation of a prompt, and profile N
autoregressive steps through a KV cache (allocator growth in steady state, peak memory).

    python artifact_isolation_check.py final_model.polar.ptz --data-path DIR --steps 512   # -> final_model.polar.ptz.isolation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

import train_gpt as tg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--data-path", default=os.environ.get("DATA_PATH", "./data/datasets/fineweb10B_sp1024"))
    p.add_argument("--tokenizer", default=os.environ.get("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model"))
    p.add_argument("--val-tokens", type=int, default=65536, help="validation tokens to score")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--prompt", default="The history of the city")
    p.add_argument("--generate", type=int, default=32)
    p.add_argument("--steps", type=int, default=512, help="autoregressive steps to profile")
    p.add_argument("--backend", default="int8_triton" if torch.cuda.is_available() else "int8")
    p.add_argument("--out", type=Path, help="the JSON report (default: beside the artifact, ARTIFACT.isolation.json)")
    a = p.parse_args()
    a.out = a.out or a.artifact.with_name(a.artifact.name + ".isolation.json")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    t0 = time.perf_counter()
    state, meta = tg.load_artifact(a.artifact)
    rehash = tg.state_hash(state)
    if rehash != meta["state_hash"]:
        raise SystemExit(f"reloaded state hash {rehash} != recorded {meta['state_hash']}: the artifact does not "
                         f"reproduce the exported model")
    model = tg.build_model(meta["model"], device)
    model.load_state_dict(state, strict=True)
    model.eval()
    args = dataclasses.replace(tg.Hyperparameters(), **meta["model"], data_path=a.data_path, tokenizer_path=a.tokenizer,
                               train_seq_len=a.seq_len, val_max_tokens=a.val_tokens, kv_quant_backend=a.backend)
    sp = tg.load_tokenizer(args)
    val = tg.load_validation_tokens(args)
    luts = tg.ByteLUTs.build(sp, device)
    with torch.no_grad():
        val_loss, val_bpb = tg.eval_teacher_forced(args, model, tg.Dist(device=device), val, luts, 8)
    if not math.isfinite(val_loss):
        raise SystemExit(f"the artifact scores val_loss {val_loss} on {val.numel() - 1} validation tokens: not a usable model")

    attn = model.blocks[0].attn
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = args.ar_eval_settings().cache
    capacity = max(a.steps, len(sp.encode(a.prompt)) + a.generate + 1)
    caches = [tg.kv.make_kv_cache(a.backend, 1, attn.num_kv_heads, attn.num_heads, capacity, attn.head_dim, device,
                                  dtype, cfg, layer=i) for i in range(len(model.blocks))]

    decoder = tg.kv.DecodeModel(model, dtype)

    def step(token: int, pos: int) -> torch.Tensor:
        with torch.no_grad():
            return decoder.decode_step(torch.tensor([token], device=device), torch.tensor([pos], device=device), caches)

    ids = [1] + sp.encode(a.prompt)
    for pos, t in enumerate(ids):
        logits = step(t, pos)
    generated = []
    for pos in range(len(ids), len(ids) + a.generate):
        generated.append(int(logits.argmax(-1)))
        logits = step(generated[-1], pos)

    for c in caches:
        c.reset()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    alloc, token = [], 1
    t1 = time.perf_counter()
    for pos in range(a.steps):
        token = int(step(token, pos).argmax(-1))
        alloc.append(torch.cuda.memory_allocated() if device.type == "cuda" else 0)
    seconds = time.perf_counter() - t1
    half = len(alloc) // 2
    report = {
        "artifact": str(a.artifact), "artifact_bytes": a.artifact.stat().st_size, "state_hash": rehash,
        "state_hash_matches": True, "val_tokens": int(val.numel() - 1), "val_loss": val_loss, "val_bpb": val_bpb,
        "prompt": a.prompt, "continuation": sp.decode(generated), "backend": a.backend, "profile_steps": a.steps,
        "eager_tok_s": a.steps / seconds, "steady_state_allocated_growth_bytes": alloc[-1] - alloc[half] if alloc else 0,
        "peak_memory_allocated_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
        "cache_tensor_bytes": sum(c.tensor_bytes() for c in caches), "seconds": time.perf_counter() - t0,
    }
    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, a.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
