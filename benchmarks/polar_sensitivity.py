"""Where polar's error costs most on a trained artifact, post hoc (no QAT): every quantized matrix through polar at
the shipped bits, then one matrix kind at a time a step up (--more) and a step down (--fewer), the mixes of
--mix, and with --fitted the shipped bits with angle codebooks fitted to the artifact's own angles (Lloyd's
iteration per padded width and level, from the analytic codebook); the teacher-forced bpb of the first --windows
validation windows. Each row: polar's bits per weight over the quantized matrices (angles and radii) and the bpb;
each kind's rows also the bpb one bit per weight buys back. Post hoc, polar costs several times what it costs
after QAT, so the rows rank kinds and codebooks; they do not predict a QAT run's score.

    python benchmarks/polar_sensitivity.py --artifact final_model.int6.ptz --data-path DIR --fitted \
        --mix attn.c_v=5,4,4,4,5/attn.proj=5,4,4,4,5/attn.c_q=3,3,3,3,3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def level_angles(w: torch.Tensor, seed: int) -> list[np.ndarray]:
    """The polar angles of a matrix's rotated rows, level by level, as PolarRowCodec forms them."""
    d = tg.padded_width(w.shape[1])
    r, out = tg.hadamard_rotate(w.float(), tg.rotation_signs(seed, d, w.device)), []
    while r.shape[1] > 1:
        a, b = r[:, 0::2], r[:, 1::2]
        out.append(torch.atan2(b, a).flatten().cpu().numpy())
        r = torch.sqrt(a * a + b * b)
    return out


def lloyd(samples: np.ndarray, init: np.ndarray, iters: int = 100) -> np.ndarray:
    """1-D Lloyd's iteration on samples from init: each centroid the mean of the samples nearest to it."""
    xs, c = np.sort(samples), np.sort(np.asarray(init, dtype=np.float64))
    for _ in range(iters):
        cell = np.searchsorted((c[1:] + c[:-1]) / 2, xs)
        count = np.bincount(cell, minlength=len(c))
        c = np.where(count > 0, np.bincount(cell, weights=xs, minlength=len(c)) / np.maximum(count, 1), c)
    return c


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: polar_tables caches per codebook
class FittedCodebook:
    """Angle codebooks of one padded width fitted to trained angles; level 0 keeps the analytic grid (a randomized
    rotation makes its angle uniform on the circle, whatever the weights)."""
    angles: dict  # level -> samples

    def __call__(self, level: int, bits: int) -> np.ndarray:
        analytic = tg.angle_codebook(level, bits)
        return analytic if level == 0 else lloyd(self.angles[level], analytic)


def fitted_codebooks(mats: dict[str, torch.Tensor], seed: int, per_matrix: int = 200_000) -> dict[int, FittedCodebook]:
    """Padded width -> its codebooks, fitted to up to `per_matrix` angles per level of each matrix."""
    pooled: dict[int, dict[int, list]] = {}
    for w in mats.values():
        for level, a in enumerate(level_angles(w, seed)):
            pooled.setdefault(tg.padded_width(w.shape[1]), {}).setdefault(level, []).append(a[::max(1, a.size // per_matrix)])
    return {d: FittedCodebook({lvl: np.concatenate(v) for lvl, v in levels.items()}) for d, levels in pooled.items()}


def polar_state(state: dict[str, torch.Tensor], codec: tg.CodecSettings,
                codebooks: dict[int, FittedCodebook] | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """Every quantized matrix as `codec` decodes it (with `codebooks` per padded width if given) -> (the state,
    polar's bits per weight over those matrices)."""
    out, bits, weights = dict(state), 0.0, 0
    for name, w in state.items():
        if not tg.is_quantized_tensor(name, w):
            continue
        d = tg.padded_width(w.shape[1])
        polar = tg.PolarRowCodec(codec.bits_of(name), codec.seed,
                                 **({"codebook": codebooks[d]} if codebooks else {}))
        delta = torch.empty_like(w, dtype=torch.float32)
        polar.fake_quant_(w.float(), delta)
        out[name] = w.float() + delta
        bits += polar.bits_per_weight(*w.shape) * w.numel()
        weights += w.numel()
    return out, bits / weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--data-path", required=True)
    p.add_argument("--tokenizer", default="data/tokenizers/fineweb_1024_bpe.model")
    p.add_argument("--windows", type=int, default=32, help="teacher-forced windows of TRAIN_SEQ_LEN scored per row")
    p.add_argument("--bits", default="4,3,3,3,4", help="the matrices' polar bits (run.sh's polar setting)")
    p.add_argument("--embed-bits", default="5,4,4,4,5")
    p.add_argument("--more", default="5,4,4,4,5", help="a kind's bits a step up")
    p.add_argument("--fewer", default="3,3,3,3,3", help="a kind's bits a step down")
    p.add_argument("--mix", nargs="*", default=[], help="POLAR_KIND_BITS mixes to score besides")
    p.add_argument("--fitted", action="store_true", help="also the shipped bits with codebooks fitted to the artifact")
    p.add_argument("--out", type=Path, default=Path("polar_sensitivity.json"))
    a = p.parse_args()
    try:  # before the artifact and the data load: bad bits fail at once, naming the grammar
        base = tg.CodecSettings.parse(f"polar:{a.bits}:{a.embed_bits}", tg.Hyperparameters.from_env().quant_seed)
        steps = tg.CodecSettings.parse(f"polar:{a.more}:{a.fewer}", 0)
        mixes = [tg.parse_kind_bits(m) for m in a.mix]
    except ValueError as e:
        p.error(str(e))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state, meta = tg.load_artifact(a.artifact)
    state = {k: v.to(device) for k, v in state.items()}
    args = dataclasses.replace(tg.Hyperparameters.from_env(), **meta["model"], data_path=a.data_path,
                               tokenizer_path=a.tokenizer)
    val = tg.load_validation_tokens(args)[:a.windows * args.train_seq_len + 1]
    luts = tg.ByteLUTs.build(tg.load_tokenizer(args), device)
    model = tg.build_model(meta["model"], device).float()

    def score(weights: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(weights)
        return tg.eval_teacher_forced(args, model, tg.Dist(device=device), val, luts, 8)[1]

    rows = [{"config": "artifact as stored", "bits_per_weight": None, "val_bpb": score(state)}]
    configs = [(base.spec(), base)]
    configs += [(f"{kind} at {','.join(map(str, bits))}", dataclasses.replace(base, kind_bits=((kind, bits),)))
                for bits in (steps.bits, steps.embed_bits) for kind in tg.MATRIX_KINDS]
    configs += [(c.spec(), c) for c in (dataclasses.replace(base, kind_bits=kinds) for kinds in mixes)]
    for label, codec in configs:
        weights, bpw = polar_state(state, codec)
        rows.append({"config": label, "bits_per_weight": bpw, "val_bpb": score(weights)})
    if a.fitted:
        weights, bpw = polar_state(state, base, fitted_codebooks({k: v for k, v in state.items()
                                                                  if tg.is_quantized_tensor(k, v)}, base.seed))
        rows.append({"config": base.spec() + ", fitted codebooks", "bits_per_weight": bpw,
                     "val_bpb": score(weights)})
    shipped = rows[1]
    print(f"{'config':<58} {'bits/w':>7} {'val_bpb':>9} {'vs polar':>9} {'bpb per bit/w':>14}")
    for r in rows:
        gain = ""
        if r["bits_per_weight"] is not None and abs(r["bits_per_weight"] - shipped["bits_per_weight"]) > 1e-9:
            r["bpb_per_bit_per_weight"] = ((shipped["val_bpb"] - r["val_bpb"])
                                           / (r["bits_per_weight"] - shipped["bits_per_weight"]))
            gain = f"{r['bpb_per_bit_per_weight']:.4f}"
        bpw = "" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
        print(f"{r['config']:<58} {bpw:>7} {r['val_bpb']:9.5f} {r['val_bpb'] - shipped['val_bpb']:+9.5f} {gain:>14}")
    a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
