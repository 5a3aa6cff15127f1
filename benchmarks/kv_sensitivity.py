"""Where a 4-bit TurboQuant KV cache's error comes from, on a trained artifact: the ring eval of the first N
validation targets with tq4 coding keys and values, keys only, values only, and then keys (or values) of one
layer at a time, each against the exact cache. The per-layer rows say which layers deserve more bits in a
mixed allocation at the same average (a 3-bit code has about 3.6x the error of a 4-bit one, a 5-bit about 0.26x).
--recent adds the codes with the R newest keys and values exact (tq4's ring), and with the R newest keys alone.

Each variant is TurboQuant's codec with every entry decoded once, when written, into an exact-layout buffer, so a
step costs what the exact cache costs (the torch reference decodes the whole cache every step); the variants are
registered under their own names for the one AR eval driver. Runs on CUDA or, slowly, on the CPU (about two
minutes a variant at the defaults on two cores).

    python benchmarks/kv_sensitivity.py --artifact final_model.polar.ptz --data-path DIR --per-layer keys
    python benchmarks/kv_sensitivity.py --artifact final_model.int6.ptz --data-path DIR --per-layer none --recent 4,8,16
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402
import triton_kv_ops as kv  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_decode import ring_deltas  # noqa: E402
from rows_file import RowsFile  # noqa: E402


class RoundtripTQ4(kv.KVCache):
    """Keys and/or values through TurboQuantMSE (encode, decode, rotate back) in the layers named; the rest exact."""

    name, code_keys, code_values, layers = "tq4_roundtrip", True, True, None  # layers None: every layer

    def allocate(self):
        self.mse = kv.TurboQuantMSE.for_cache(self)
        self.buffer("k", self.head_dim, dtype=torch.float32)
        self.buffer("v", self.head_dim, dtype=torch.float32)

    @property
    def layer_coded(self) -> bool:
        return self.layers is None or self.layer in self.layers

    def roundtrip(self, x, coded: bool):
        if not (coded and self.layer_coded):
            return x.float()
        return self.mse.decode_rotated(*self.mse.encode(x)) @ self.mse.rotation.T

    def write(self, k, v, slots, active):
        self.store("k", slots, active, self.roundtrip(k, self.code_keys))
        self.store("v", slots, active, self.roundtrip(v, self.code_values))

    def scores(self, q):
        return torch.einsum("bhgd,bhnd->bhgn", q, self.k)

    def values(self):
        return self.v

    def bytes_per_token(self):  # what is coded takes tq4's bytes, the rest bf16's
        per_vector = {True: self.head_dim // 2 + 2, False: 2 * self.head_dim}
        return self.heads * sum(per_vector[self.layer_coded and c] for c in (self.code_keys, self.code_values))


class RoundtripRecent(kv.RecentExactMixin, RoundtripTQ4):
    """Every entry through the codec, and the `recent` newest kept exact besides (keys, and values where
    ring_values), as tq4's ring does."""


def variant(label: str, base: type = RoundtripTQ4, **settings) -> str:
    kv.KV_BACKENDS[label] = type(label, (base,), {"name": label, **settings})
    return label


def variants(layers: int, per_layer: list[str], recent: list[int] = ()) -> list[str]:
    names = [variant("tq4_kv"), variant("tq4_keys", code_values=False), variant("tq4_values", code_keys=False)]
    for r in recent:
        names += [variant(f"tq4_kv_recent{r}", RoundtripRecent, recent=r, ring_values=True),
                  variant(f"tq4_kv_recent{r}_keys", RoundtripRecent, recent=r)]
    for part in per_layer:
        other = {"keys": "code_values", "values": "code_keys"}[part]
        names += [variant(f"tq4_{part}_layer{i}", layers=(i,), **{other: False}) for i in range(layers)]
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--data-path", required=True)
    p.add_argument("--tokenizer", default="data/tokenizers/fineweb_1024_bpe.model")
    p.add_argument("--tokens", type=int, default=16_384, help="validation targets scored per variant")
    p.add_argument("--batch", type=int, default=16, help="ring rows")
    p.add_argument("--per-layer", default="keys", help="keys, values, both (keys,values) or none")
    p.add_argument("--recent", default="", help="comma-separated ring sizes: the R newest entries exact besides")
    p.add_argument("--out", type=Path, default=Path("kv_sensitivity.json"))
    a = p.parse_args()
    per_layer = [] if a.per_layer == "none" else a.per_layer.split(",")
    if not set(per_layer) <= {"keys", "values"}:
        p.error(f"--per-layer takes keys, values, keys,values or none, not {a.per_layer}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state, meta = tg.load_artifact(a.artifact)
    model = tg.build_model(meta["model"], device)
    model.load_state_dict(state)
    model.eval()
    args = dataclasses.replace(tg.Hyperparameters.from_env(), **meta["model"], data_path=a.data_path,
                               tokenizer_path=a.tokenizer, kv_eval_batch=a.batch, kv_eval_cuda_graph=False)
    val = tg.load_validation_tokens(args)
    luts = tg.ByteLUTs.build(tg.load_tokenizer(args), device)
    recent = [int(r) for r in a.recent.split(",") if r]
    if any(r < 1 for r in recent):
        p.error(f"--recent takes ring sizes of at least 1, not {a.recent}")
    RowsFile(a.out).extend(ring_deltas(args, model, val, luts, variants(args.num_layers, per_layer, recent), a.tokens,
                                       device))


if __name__ == "__main__":
    main()
