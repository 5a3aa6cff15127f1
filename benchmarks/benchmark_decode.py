"""Autoregressive decode throughput of a trained artifact per KV backend and batch size, through the same
driver as the final eval: windows mode (validation windows tiled to fill the batch, their bpb against
teacher forcing; a window's cache averages half full) and the ring eval's steady state (every row's cache
full: C entries, the --steps decode steps after the first C are timed).
Without an artifact: a randomly initialized challenge-size model (throughput only; its bpb means nothing).
With --ring-tokens N: instead, the artifact rescored by the ring eval over the first N validation targets, the
exact backend and then each backend, its delta vs exact and bytes/token (KV settings from the environment,
as the trainer reads them), so a KV codec can be ranked on trained weights without retraining.

    python benchmarks/benchmark_decode.py --artifact final_model.polar.ptz --data-path DIR --batches 1,64,256,512,1024,2048
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402
import triton_kv_ops as kv  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows_file import RowsFile  # noqa: E402


def ring_decoder(args, model, val, backend: str, batch: int, steps: int, device) -> kv.Decoder:
    """A decoder over `batch` validation streams, its ring caches already full (C steps decoded)."""
    context = args.kv_eval_context_len or args.train_seq_len
    length = context + steps
    tokens = val[:-1].repeat(-(-batch * (length + 1) // (val.numel() - 1)))[:batch * (length + 1)]
    rows = tokens.reshape(batch, length + 1).to(device)
    decoder = kv.Decoder(model, backend, batch, length + 1, context, args.ar_eval_settings().cache, device,
                         torch.bfloat16, use_graph=True)
    decoder.rows.copy_(rows)
    decoder._reset(batch)
    decoder.window[:, 1] = length
    for _ in range(context):
        decoder.graph.replay()
    torch.cuda.synchronize()
    assert all(int(c.lengths.min()) == context for c in decoder.caches)
    return decoder


def full_cache_tok_s(args, model, val, backend: str, batch: int, steps: int, device) -> float:
    decoder = ring_decoder(args, model, val, backend, batch, steps, device)
    t0 = time.perf_counter()
    for _ in range(steps):
        decoder.graph.replay()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def profile(args, model, val, backend: str, batch: int, device, steps: int = 64) -> list[dict]:
    """Per-kernel CUDA times of `steps` graph replays at `batch`, every cache full (the ring eval's steady state):
    a line per kernel, its share of a step's CUDA time and its time a call; a row per kernel and one for the step
    ("kernel": "step")."""
    decoder = ring_decoder(args, model, val, backend, batch, steps, device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                     key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in kernels)
    print(f"profile {backend} batch {batch}: {total / steps:.1f} us of CUDA time a decode step ({steps} steps)")
    for e in kernels[:12]:
        print(f"profile {backend} batch {batch}  {e.key[:60]:<60} {e.self_device_time_total / 1e3:9.3f} ms "
              f"{100 * e.self_device_time_total / total:5.1f}%  {e.count // steps:>3} a step, "
              f"{e.self_device_time_total / e.count:8.2f} us a call")
    return [{"backend": backend, "batch": batch, "kernel": "step", "us_per_step": total / steps}] + [
        {"backend": backend, "batch": batch, "kernel": e.key, "us_per_step": e.self_device_time_total / steps,
         "us_per_call": e.self_device_time_total / e.count} for e in kernels]


def ring_deltas(args, model, val, luts, backends: list[str], n_tokens: int, device) -> Iterator[dict]:
    """The ring eval (KV_EVAL_BATCH rows, a C-entry ring) of the first n_tokens targets through the exact backend,
    then through each backend, with its delta vs exact: a row each, as it is measured."""
    if val.numel() - 1 < n_tokens:
        raise SystemExit(f"--ring-tokens {n_tokens}: the validation split holds only {val.numel() - 1} targets")
    plan = kv.ring_plan(val[:n_tokens + 1], args.kv_eval_batch, args.kv_eval_context_len or args.train_seq_len)
    exact = None
    for backend in [kv.exact_backend(device), *backends]:
        r = kv.autoregressive_eval(args.ar_eval_settings(), model, plan, luts, backend, device, print)
        exact = exact or r
        r["delta_vs_exact"] = r["val_bpb"] - exact["val_bpb"]
        print(f"ring {r['backend']:<20} val_bpb {r['val_bpb']:.6f}  delta_vs_exact {r['delta_vs_exact']:+.6f}  "
              f"bytes/token {r['bytes_per_token']} ({r['bytes_per_token'] / exact['bytes_per_token']:.3f}x bf16)  "
              f"{r['tok_s']:.0f} tok/s over {r['tokens']} tokens", flush=True)
        yield r


def throughput(args, model, val, luts, backends: list[str], batches: list[int], batch1_windows: int, steps: int,
               device) -> Iterator[dict]:
    """Per backend and batch: the windows-mode AR eval (its bpb against teacher forcing) and full-cache tok/s, a row
    each, as it is measured."""
    teacher_forced = {}
    for backend in backends:
        for batch in batches:
            windows = batch1_windows if batch == 1 else batch
            reps = -(-windows * args.train_seq_len // (val.numel() - 1)) + 1
            tokens = val[:-1].repeat(reps)[:windows * args.train_seq_len + 1]
            if windows not in teacher_forced:  # the same windows scored in one forward pass: the exact reference
                with torch.no_grad():
                    teacher_forced[windows] = tg.eval_teacher_forced(args, model, tg.Dist(device=device), tokens, luts, 64)[1]
            r = kv.autoregressive_eval(args.ar_eval_settings(), model, kv.window_plan(tokens, args.train_seq_len), luts,
                                       backend, device, print, batch=batch)
            r["teacher_forced_val_bpb"] = teacher_forced[windows]
            r["full_cache_tok_s"] = full_cache_tok_s(args, model, val, backend, batch, steps, device)
            print(f"{backend:<12} batch {batch:>4}: windows {r['tok_s']:>10.0f} tok/s, full cache "
                  f"{r['full_cache_tok_s']:>10.0f} tok/s  val_bpb {r['val_bpb']:.6f} "
                  f"(teacher-forced {teacher_forced[windows]:.6f})  peak {r['peak_mem_mib']:.0f} MiB  "
                  f"bytes/token {r['bytes_per_token']}", flush=True)
            yield r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--artifact", type=Path)
    p.add_argument("--data-path", required=True)
    p.add_argument("--tokenizer", default="data/tokenizers/fineweb_1024_bpe.model")
    p.add_argument("--backends", default="bf16_triton,int8_triton,qjl_triton")
    p.add_argument("--batches", default="1,64,256,512,1024,2048")
    p.add_argument("--batch1-windows", type=int, default=4, help="windows decoded at batch 1")
    p.add_argument("--steps", type=int, default=256, help="full-cache decode steps timed per backend and batch")
    p.add_argument("--profile", type=int, metavar="BATCH", help="instead: per-kernel CUDA times of 64 graph replays "
                   "at this batch, every cache full, of the first backend (torch.profiler)")
    p.add_argument("--ring-tokens", type=int, metavar="N", help="instead: the ring eval's delta vs exact per backend "
                   "over the first N validation targets (needs --artifact)")
    p.add_argument("--out", type=Path, default=Path("decode_bench.json"))
    a = p.parse_args()
    if not torch.cuda.is_available():
        p.error("times CUDA kernels and graphs: run it on a GPU machine (benchmarks/device_run.sh)")
    if a.ring_tokens and not a.artifact:
        p.error("--ring-tokens rescores a trained model: pass --artifact")
    device = torch.device("cuda")
    if a.artifact:
        state, meta = tg.load_artifact(a.artifact)
        config = meta["model"]
    else:
        torch.manual_seed(0)
        config = tg.Hyperparameters().model_config()
    model = tg.build_model(config, device)
    if a.artifact:
        model.load_state_dict(state)
    else:
        with torch.no_grad():
            for w in model.parameters():
                w.add_(torch.randn_like(w) * 0.02)
    model.eval()
    args = dataclasses.replace(tg.Hyperparameters.from_env(), **config, data_path=a.data_path, tokenizer_path=a.tokenizer)
    val = tg.load_validation_tokens(args)
    luts = tg.ByteLUTs.build(tg.load_tokenizer(args), device)
    out = RowsFile(a.out)
    if a.profile:
        rows = profile(args, model, val, a.backends.split(",")[0], a.profile, device)
    elif a.ring_tokens:
        rows = ring_deltas(args, model, val, luts, a.backends.split(","), a.ring_tokens, device)
    else:
        rows = throughput(args, model, val, luts, a.backends.split(","), [int(b) for b in a.batches.split(",")],
                          a.batch1_windows, a.steps, device)
    out.extend(rows)


if __name__ == "__main__":
    main()
