"""Effective bits per weight and compressed bytes per weight scheme for the challenge-size model,
plus the fused polar fake-quant kernel's time over all matrices (CUDA).

    python benchmarks/benchmark_codecs.py --artifact final_model.int8.ptz   # weights of a trained run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

SETTINGS = [("int8", None, None), ("polar", "2,2,2,2,2", "4,3,3,3,4"), ("polar", "3,2,2,2,3", "5,4,4,4,5"),
            ("polar", "3,3,3,3,4", "5,4,4,4,5"), ("polar", "4,3,3,3,4", "5,4,4,4,5"),
            ("polar", "4,4,3,4,5,6", "5,4,4,4,5"), ("polar", "5,4,4,4,5", "5,4,4,4,5"), ("polar", "6,5,5,5,6", "6,5,5,5,6")]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--artifact", type=Path, help="take the weights from this artifact (else trained-like synthetic weights)")
    p.add_argument("--synthetic", choices=("student_t", "gaussian"), default="student_t",
                   help="without --artifact: the distribution of the synthetic matrices")
    p.add_argument("--compressors", default="zlib,lzma")
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
                t = (torch.distributions.StudentT(4.0).sample(v.shape) if a.synthetic == "student_t"
                     else torch.randn(v.shape, generator=gen)) * 0.02
                state[k] = t * (torch.rand(v.shape[0], 1, generator=gen) + 0.5)
    quantized = {k: v for k, v in state.items() if tg.is_quantized_tensor(k, v)}
    n = sum(v.numel() for v in quantized.values())
    rows, int8_bytes = [], None
    for scheme, bits, ebits in SETTINGS:
        args = dataclasses.replace(tg.Hyperparameters(), weight_quant_scheme=scheme, polar_bits=bits or "4",
                                   polar_embed_bits=ebits or "4")
        for comp in args_compressors:
            args.compressor = comp
            path = Path(f"/tmp/codec_bench_{scheme}_{comp}.ptz")
            st = tg.export_artifact({k: v.to(device) for k, v in state.items()}, args, path)
            deq, _ = tg.load_artifact(path)
            err = sum(float(((deq[k] - v.float()) ** 2).sum()) for k, v in quantized.items()) / sum(
                float((v.float() ** 2).sum()) for v in quantized.values())
            row = {"scheme": scheme, "bits": bits, "embed_bits": ebits, "compressor": comp, "artifact_bytes": st["bytes"],
                   "bits_per_quantized_weight": 8 * st["bytes"] / n, "rel_mse": err}
            if scheme == "int8" and comp == "zlib":
                int8_bytes = st["bytes"]
            row["frac_of_int8_zlib"] = st["bytes"] / int8_bytes
            rows.append(row)
    timing = {}
    if device.type == "cuda":
        args = tg.Hyperparameters()
        for scheme in ("int8", "polar"):
            codecs = [(v.to(device).contiguous(), torch.empty_like(v, device=device), tg.make_codec(scheme, args, k))
                      for k, v in quantized.items()]
            run = lambda cs=codecs: [c.fake_quant_(w, o) for w, o, c in cs]  # noqa: E731
            run()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                run()
            torch.cuda.synchronize()
            timing[scheme] = (time.perf_counter() - t) / 20 * 1000
    print(f"quantized weights: {n}")
    print(f"{'scheme':<7}{'bits':<14}{'embed':<11}{'comp':<6}{'bytes':>11}{'bits/w':>8}{'x int8':>8}{'rel_mse':>10}")
    for r in rows:
        print(f"{r['scheme']:<7}{str(r['bits'] or '-'):<14}{str(r['embed_bits'] or '-'):<11}{r['compressor']:<6}"
              f"{r['artifact_bytes']:>11}{r['bits_per_quantized_weight']:>8.3f}{r['frac_of_int8_zlib']:>8.3f}{r['rel_mse']:>10.5f}")
    for scheme, ms in timing.items():
        print(f"fake_quant all matrices ({scheme}): {ms:.3f} ms")
    a.out.write_text(json.dumps({"weights": n, "rows": rows, "fake_quant_ms": timing}, indent=2))


if __name__ == "__main__":
    main()
