"""Effective bits per weight, compressed bytes and relative weight error per codec for the challenge-size
model, plus each codec's fake-quant time over all matrices (CUDA). Scores per codec come from the trainer's
CODEC_COMPARE, which rescores the same trained weights with each.

    python benchmarks/benchmark_codecs.py --artifact final_model.int8.ptz   # weights of a trained run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

SPECS = ["int8", "int:8:8", "int:6:8", "int:6:8:rot", "int:5:8", "int:5:8:rot", "int:4:8", "int:4:8:rot",
         "polar:2,2,2,2,2:4,3,3,3,4", "polar:3,2,2,2,3:5,4,4,4,5", "polar:3,3,3,3,4:5,4,4,4,5", "polar:4,3,3,3,4:5,4,4,4,5",
         "polar:5,4,4,4,5:5,4,4,4,5"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--artifact", type=Path, help="take the weights from this artifact (else trained-like synthetic weights)")
    p.add_argument("--synthetic", choices=("student_t", "gaussian"), default="student_t",
                   help="without --artifact: the distribution of the synthetic matrices")
    p.add_argument("--compressors", default="zlib,lzma")
    p.add_argument("--codecs", default=" ".join(SPECS), help="space-separated codec specs (train_gpt.CodecSettings)")
    p.add_argument("--out", type=Path, default=Path("codec_bench.json"))
    a = p.parse_args()
    args_compressors = a.compressors.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.artifact:
        state, meta = tg.load_artifact(a.artifact)
    else:  # rows with uneven scales, like trained matrices (a fresh init is mostly zeros); the tail shape
        # decides how far zlib squeezes int8 codes, so both a heavy-tailed and a Gaussian set are offered
        state = tg.build_model(tg.Hyperparameters().model_config(), torch.device("cpu")).state_dict()
        gen = torch.Generator().manual_seed(0)
        for k, v in state.items():
            if tg.is_quantized_tensor(k, v):
                t = torch.randn(v.shape, generator=gen) * 0.02
                if a.synthetic == "student_t":  # 4 degrees of freedom
                    t = t / torch.randn(4, *v.shape, generator=gen).square().mean(0).sqrt()
                state[k] = t * (torch.rand(v.shape[0], 1, generator=gen) + 0.5)
    quantized = {k: v for k, v in state.items() if tg.is_quantized_tensor(k, v)}
    n = sum(v.numel() for v in quantized.values())
    rows, int8_bytes = [], 0
    config = meta["model"] if a.artifact else tg.Hyperparameters().model_config()
    codecs = [tg.CodecSettings.parse(spec, tg.Hyperparameters.quant_seed) for spec in a.codecs.split()]
    for codec in codecs:
        for comp in args_compressors:
            with tempfile.TemporaryDirectory() as scratch:  # each artifact written and read back, then gone
                path = Path(scratch) / f"{codec.label}_{comp}.ptz"
                st = tg.export_artifact({k: v.to(device) for k, v in state.items()}, codec, config, comp, path)
                deq, _ = tg.load_artifact(path)
            err = sum(float(((deq[k] - v.float()) ** 2).sum()) for k, v in quantized.items()) / sum(
                float((v.float() ** 2).sum()) for v in quantized.values())
            row = {"codec": codec.spec(), "compressor": comp, "artifact_bytes": st["bytes"],
                   "bits_per_quantized_weight": 8 * st["bytes"] / n, "rel_mse": err}
            if codec.spec() == "int8" and comp == "zlib":
                int8_bytes = st["bytes"]
            row["frac_of_int8_zlib"] = st["bytes"] / int8_bytes if int8_bytes else float("nan")
            rows.append(row)
    timing = {}
    if device.type == "cuda":
        for codec in codecs:
            targets = [(v.to(device).contiguous(), torch.empty_like(v, device=device), codec.codec(k))
                       for k, v in quantized.items()]
            run = lambda cs=targets: [c.fake_quant_(w, o) for w, o, c in cs]  # noqa: E731
            run()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                run()
            torch.cuda.synchronize()
            timing[codec.spec()] = (time.perf_counter() - t) / 20 * 1000
    print(f"quantized weights: {n}")
    print(f"{'codec':<28}{'comp':<6}{'bytes':>11}{'bits/w':>8}{'x int8':>8}{'rel_mse':>10}")
    for r in rows:
        print(f"{r['codec']:<28}{r['compressor']:<6}{r['artifact_bytes']:>11}{r['bits_per_quantized_weight']:>8.3f}"
              f"{r['frac_of_int8_zlib']:>8.3f}{r['rel_mse']:>10.5f}")
    for spec, ms in timing.items():
        print(f"fake_quant all matrices ({spec}): {ms:.3f} ms")
    a.out.write_text(json.dumps({"weights": n, "rows": rows, "fake_quant_ms": timing}, indent=2))


if __name__ == "__main__":
    main()
