"""KV-cache backends for the autoregressive eval: one interface, torch references, Triton kernels.

Every backend holds static buffers (B, KV heads, capacity, ...) and on-device lengths, so a decode
step can be captured in a CUDA graph:
    reset()                      forget every entry (lengths <- 0)
    append(k, v, positions)      quantize-on-write the new token of each row at slot position % capacity;
                                 a row whose position is negative is inactive: nothing written, length kept
    prologue(qkv, positions, inv_freq, q_gain) -> q
                                 the decode step's attention prologue: split a fused QKV projection,
                                 RMS-norm q and k, rotate them at their positions, scale q by its gain,
                                 append k and v; the Triton backends do all of it in one kernel. q comes
                                 back in the form this backend's attend takes (for tq4_triton and
                                 qjl_triton: in the layer's rotated basis, a RotatedQuery)
    attend(q) -> out             all query heads of each KV head at once (GQA, no repeated K/V); a plain
                                 q (B, Hq, D) is accepted by every backend
    as_query(q)                  a plain q in the form prologue returns it (for benchmarks and tests)
    bytes_per_token()            logical packed bytes of one token's K and V (all KV heads, one layer)
    tensor_bytes()               bytes the buffers hold
The module also holds the rest of the decode step's kernels (residual + RMSNorm, small-batch linear,
next-token scoring), each beside its torch reference, and last the autoregressive eval that drives them:
token plans (windows, ring), the decoder (one cache per layer, a CUDA graph per step) and the final AR
evals the trainer logs.

Keys are cached after RoPE at their absolute position, so a ring buffer that evicts old entries
keeps relative positions true. The Triton attention follows flash decoding in one launch: the
filled length is split across programs (online softmax, partial output + log-sum-exp), and the
last split of each (row, KV head) to finish merges the parts. tq4 keys and values are scored in
the layer's rotated basis (the query rotated once by the prologue), their nibbles (sign and
magnitude) decoded by byte permutes over an 8-entry table held in registers. qjl keys are tq4
keys plus QJL on their residual: sign bits of its sketch, looked up 4 at a time from a 128-byte
fp16 table (not unpacked bit by bit) and scored against the sketched query by a tensor-core dot.

Adding a backend:
  1. a torch reference: a KVCache subclass with a `name`, its buffers (allocate), write, scores,
     values and bytes_per_token, listed in TORCH_BACKENDS (RecentExactMixin in front of a rotated-basis
     codec keeps its newest entries exact; the kernels take its rings by RECENT and RECENT_VALUES);
  2. if its codes are new to the kernels, a named codec: a branch in _store_codes (writing) and
     in _key_scores or _value_halves (reading); a codec the kernels do not know fails to compile;
  3. its Triton class: TritonAttendMixin over the reference, with `name`, `key_codec`,
     `value_codec`, `launch` (per regime, from benchmark_kv_backends.py --sweep) and `codes()`
     (plus `tables()`; RotatedAttendMixin for keys scored in a rotated basis; `capacity_multiple`
     where its kernels read whole tiles of entries), listed in TRITON_BACKENDS.
The registry, the env validation, the tests and the benchmarks' lists derive from those tuples.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


@dataclass(frozen=True)
class KVConfig:
    group_size: int = 32  # channels sharing one fp16 scale
    qjl_dim: int = 32  # sketch bits of each key's residual (m): 32 keeps qjl at 0.297x bf16's bytes
    value_bits: int = 4  # value codes for the QJL backends (4 or 8)
    recent_exact_tokens: int | None = None  # newest entries kept exact (None: the backend's own; 0: none)
    seed: int = 0

    def __post_init__(self):
        """Refuses settings the kernels cannot take, naming the environment variable that sets each."""
        for name, ok, what in (("value_bits", self.value_bits in (4, 8), "must be 4 or 8"),
                               ("qjl_dim", self.qjl_dim in (32, 64, 128, 256),
                                "must be 32, 64, 128 or 256 (the kernels' sketch tiles)"),
                               ("recent_exact_tokens", (self.recent_exact_tokens or 0) >= 0, "must be >= 0")):
            if not ok:
                raise ValueError(f"KV_{name.upper()}={getattr(self, name)!r}: {what}")


# -----------------------------------------------------------------------------
# Shared quantizers (torch): symmetric group quantization, round-half-up, fp16 scales
# -----------------------------------------------------------------------------


def group_quantize(x: Tensor, group: int, bits: int) -> tuple[Tensor, Tensor]:
    """x (..., D) -> codes int8 (..., D) in [-qmax, qmax], scales fp16 (..., D // group)."""
    qmax = 2 ** (bits - 1) - 1
    xg = x.float().reshape(*x.shape[:-1], -1, group)
    scale = (xg.abs().amax(-1) / qmax).clamp_min(2.0 ** -24).half()  # the least fp16 above 0
    q = torch.floor(xg / scale.float()[..., None] + 0.5).clamp(-qmax, qmax)
    return q.reshape(x.shape).to(torch.int8), scale


def group_dequantize(q: Tensor, scale: Tensor, group: int) -> Tensor:
    return (q.float().reshape(*q.shape[:-1], -1, group) * scale.float()[..., None]).reshape(q.shape)


def fwht(x: Tensor) -> Tensor:
    """Unnormalized Sylvester-Hadamard transform over the last dim (a power of two)."""
    shape, d, h = x.shape, x.shape[-1], 1
    while h < d:
        x = x.reshape(*shape[:-1], d // (2 * h), 2, h)
        x = torch.stack((x[..., 0, :] + x[..., 1, :], x[..., 0, :] - x[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(shape)


def pack_nibbles(q: Tensor) -> Tensor:
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_nibbles(p: Tensor) -> Tensor:
    lo, hi = (p & 15).to(torch.int16) - 8, (p >> 4).to(torch.int16) - 8
    return torch.stack((lo, hi), -1).reshape(*p.shape[:-1], -1).to(torch.int8)


def pack_signs(x: Tensor) -> Tensor:
    """x (..., m) -> uint8 (..., m/8), bit j of byte i set where x[8i + j] >= 0."""
    bits = (x >= 0).to(torch.uint8).reshape(*x.shape[:-1], -1, 8)
    return (bits << torch.arange(8, device=x.device, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_signs(p: Tensor) -> Tensor:
    bits = (p[..., None] >> torch.arange(8, device=p.device, dtype=torch.uint8)) & 1
    return bits.reshape(*p.shape[:-1], -1).float() * 2 - 1


def sign_table(device) -> Tensor:
    """(16 * 4,) fp16: row `nibble` holds the 4 signs that nibble of packed QJL bits stands for. The attention
    kernel looks keys up here, 4 signs per load, instead of unpacking bits one by one, and needs no conversion;
    128 bytes, so a warp's lookups touch one L1 line (a table per bit would spread them over 16)."""
    bits = (torch.arange(16, device=device)[:, None] >> torch.arange(4, device=device)) & 1
    return (bits * 2 - 1).reshape(-1).to(torch.float16)


def put_rows(buf: Tensor, slots: Tensor, active: Tensor, value: Tensor) -> None:
    """buf[b, :, slots[b]] = value[b] for each active row b; an inactive row keeps the entry (no host sync)."""
    rows = torch.arange(buf.shape[0], device=buf.device)
    keep = active.view(-1, *([1] * (value.dim() - 1)))
    buf[rows, :, slots] = torch.where(keep, value.to(buf.dtype), buf[rows, :, slots])


def qjl_sketch(head_dim: int, m: int, seed: int, device) -> Tensor:
    """Gaussian (m, head_dim) in fp16: the caches store it so, and the kernels' tensor-core dots take it exactly."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, head_dim, generator=gen, device="cpu").half().to(device)


# -----------------------------------------------------------------------------
# Attention prologue (torch): the model's training forward and the decode reference share it
# -----------------------------------------------------------------------------


def rotary_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def norm_rotate(q: Tensor, k: Tensor, positions: Tensor, inv_freq: Tensor, q_gain: Tensor) -> tuple[Tensor, Tensor]:
    """q (..., H, D) and k (..., Hkv, D) at positions (...): RMS-normed per head, rotated, q scaled by its gain."""
    q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
    cos, sin = rotary_cos_sin(positions, inv_freq, q.dtype)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return apply_rotary(q, cos, sin) * q_gain.to(q.dtype)[:, None], apply_rotary(k, cos, sin)


def split_qkv(qkv: Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = qkv.split((num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim), dim=-1)
    lead = qkv.shape[:-1]
    return (q.reshape(*lead, num_q_heads, head_dim), k.reshape(*lead, num_kv_heads, head_dim),
            v.reshape(*lead, num_kv_heads, head_dim))


# -----------------------------------------------------------------------------
# Torch reference backends
# -----------------------------------------------------------------------------


class KVCache:
    """Base: buffers, lengths and a masked softmax over the whole buffer (O(capacity), the reference)."""

    recent, recent_values = 0, False  # entries kept exact besides the codes (RecentExactMixin)
    capacity_multiple = 1  # what the capacity must be a multiple of (its kernels read whole tiles of entries)
    # The orthogonal (D, D) basis attend_in_basis leaves its output in (out @ output_basis); None: out as it is.
    output_basis: Tensor | None = None

    def __init__(self, batch: int, num_kv_heads: int, num_q_heads: int, capacity: int, head_dim: int,
                 device, dtype: torch.dtype, cfg: KVConfig = KVConfig(), layer: int = 0):
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads do not split over {num_kv_heads} KV heads")
        if capacity % self.capacity_multiple:
            raise ValueError(f"KV backend {self.name} reads its cache in tiles of {self.capacity_multiple} entries: a "
                             f"capacity of {capacity} is not a multiple of {self.capacity_multiple}; round it up")
        self.batch, self.heads, self.q_heads, self.capacity, self.head_dim = batch, num_kv_heads, num_q_heads, capacity, head_dim
        self.device, self.dtype, self.cfg, self.layer = torch.device(device), dtype, cfg, layer
        self.sm_scale = head_dim ** -0.5
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.buffers: dict[str, Tensor] = {}
        self.allocate()

    def buffer(self, name: str, *trailing: int, dtype: torch.dtype, entries: bool = True) -> Tensor:
        """A zeroed (B, Hkv, capacity, *trailing) buffer (without `entries`: (B, Hkv, *trailing)) whose storage runs on
        to a whole 4-byte word: the kernels read per-entry fp16 values as the int32 words that hold them
        (_entry_fp16)."""
        shape = (self.batch, self.heads, *((self.capacity,) if entries else ()), *trailing)
        n, size = math.prod(shape), dtype.itemsize
        t = torch.zeros(-(-n * size // 4) * 4 // size, dtype=dtype, device=self.device)[:n].view(shape)
        self.buffers[name] = t
        setattr(self, name, t)
        return t

    def reset(self) -> None:
        self.lengths.zero_()

    def append(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        active = positions >= 0
        self.write(k, v, positions.clamp_min(0) % self.capacity, active)
        self.lengths.copy_(torch.where(active, torch.clamp(positions + 1, max=self.capacity), self.lengths))

    def store(self, name: str, slots: Tensor, active: Tensor, value: Tensor) -> None:
        put_rows(self.buffers[name], slots, active, value)

    def prologue(self, qkv: Tensor, positions: Tensor, inv_freq: Tensor, q_gain: Tensor) -> Tensor:
        """qkv (B, (Hq + 2 Hkv) D) of one token per row -> q (B, Hq, D); k and v appended."""
        q, k, v = split_qkv(qkv, self.q_heads, self.heads, self.head_dim)
        q, k = norm_rotate(q, k, positions, inv_freq, q_gain)
        self.append(k, v, positions)
        return q

    def as_query(self, q: Tensor) -> Tensor:
        """A plain q (B, Hq, D) in the form this backend's prologue hands to attend (benchmarks time that form)."""
        return q

    def attend_in_basis(self, q: Tensor) -> Tensor:
        """attend(q) @ output_basis, which a backend computes before it rotates back: the decoder folds the basis into
        the attention's output projection instead (DecodeModel.output_projections)."""
        return self.attend(q)

    def attend(self, q: Tensor) -> Tensor:
        b, g = self.batch, self.q_heads // self.heads
        qf = q.float().reshape(b, self.heads, g, self.head_dim)
        s = self.scores(qf) * self.sm_scale
        valid = torch.arange(self.capacity, device=self.device)[None, :] < self.lengths[:, None]
        p = torch.softmax(s.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
        out = torch.einsum("bhgn,bhnd->bhgd", p, self.values())
        return out.reshape(b, self.q_heads, self.head_dim).to(q.dtype)

    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values()) + getattr(self, "extra_bytes", 0)

    def prewarm(self) -> None:
        """Compiles every kernel this backend launches, then forgets the dummy entry."""
        def randn(*shape, dtype=self.dtype):
            return torch.randn(*shape, device=self.device, dtype=dtype)

        positions = torch.zeros(self.batch, dtype=torch.int64, device=self.device)
        self.append(randn(self.batch, self.heads, self.head_dim), randn(self.batch, self.heads, self.head_dim), positions)
        qkv = randn(self.batch, (self.q_heads + 2 * self.heads) * self.head_dim)
        q = self.prologue(qkv, positions, randn(self.head_dim // 2, dtype=torch.float32), randn(self.q_heads))
        self.attend(q)
        self.reset()

    def allocate(self) -> None:
        raise NotImplementedError

    def write(self, k: Tensor, v: Tensor, slots: Tensor, active: Tensor) -> None:
        raise NotImplementedError

    def scores(self, q: Tensor) -> Tensor:
        """q (B, Hkv, G, D) fp32 -> unscaled scores (B, Hkv, G, capacity)."""
        raise NotImplementedError

    def values(self) -> Tensor:
        """Dequantized values (B, Hkv, capacity, D) fp32."""
        raise NotImplementedError

    def bytes_per_token(self) -> int:
        raise NotImplementedError


class ExactCache(KVCache):
    """K and V in the model's compute dtype (bf16 on CUDA, fp32 in CPU tests): the exact reference."""

    name = "bf16"

    def allocate(self):
        self.buffer("k", self.head_dim, dtype=self.dtype)
        self.buffer("v", self.head_dim, dtype=self.dtype)

    def write(self, k, v, slots, active):
        self.store("k", slots, active, k)
        self.store("v", slots, active, v)

    def scores(self, q):
        return torch.einsum("bhgd,bhnd->bhgn", q, self.k.float())

    def values(self):
        return self.v.float()

    def bytes_per_token(self):
        return 2 * self.heads * self.head_dim * torch.finfo(self.dtype).bits // 8


class Int8Cache(KVCache):
    """K and V as symmetric int8 with one fp16 scale per KV_GROUP_SIZE channels."""

    name = "int8"

    def allocate(self):
        g = self.head_dim // self.cfg.group_size
        self.buffer("k_q", self.head_dim, dtype=torch.int8)
        self.buffer("k_s", g, dtype=torch.float16)
        self.buffer("v_q", self.head_dim, dtype=torch.int8)
        self.buffer("v_s", g, dtype=torch.float16)

    def write(self, k, v, slots, active):
        for name, x in (("k", k), ("v", v)):
            q, s = group_quantize(x, self.cfg.group_size, 8)
            self.store(f"{name}_q", slots, active, q)
            self.store(f"{name}_s", slots, active, s)

    def scores(self, q):
        return torch.einsum("bhgd,bhnd->bhgn", q, group_dequantize(self.k_q, self.k_s, self.cfg.group_size))

    def values(self):
        return group_dequantize(self.v_q, self.v_s, self.cfg.group_size)

    def bytes_per_token(self):
        return 2 * self.heads * (self.head_dim + 2 * self.head_dim // self.cfg.group_size)


@lru_cache(maxsize=None)
def gaussian_lloyd_max(levels: int) -> tuple[float, ...]:
    """The Lloyd-Max quantizer of N(0, 1): `levels` centroids, each the mean of its cell, whose edges are the
    midpoints between centroids; Lloyd's iteration on the closed-form cell means, to a fixed point (1e-12)."""
    cents = torch.linspace(-2.5, 2.5, levels, dtype=torch.float64)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(100_000):
        edges = torch.cat((-inf, (cents[1:] + cents[:-1]) / 2, inf))
        pdf = torch.exp(-edges * edges / 2) / math.sqrt(2 * math.pi)  # 0 at +-inf
        new = (pdf[:-1] - pdf[1:]) / (torch.special.ndtr(edges[1:]) - torch.special.ndtr(edges[:-1]))
        if float((new - cents).abs().max()) < 1e-12:
            return tuple(new.tolist())
        cents = new
    raise RuntimeError(f"Lloyd's iteration for {levels} levels did not converge")


def tq4_magnitudes() -> tuple[float, ...]:
    """tq4's 8 magnitudes: the positive half of N(0, 1)'s 16-level Lloyd-Max codebook, ascending."""
    return gaussian_lloyd_max(16)[8:]


def tq4_byte_tables() -> tuple[int, int, int, int]:
    """The fp16 bit patterns of tq4's 8 magnitudes as byte-permute tables: the low bytes of magnitudes 0-3 and
    4-7, then their high bytes, byte i of a word for magnitude i (mod 4); as signed int32 values (Triton's)."""
    bits = torch.tensor(tq4_magnitudes(), dtype=torch.float16).view(torch.int16).int() & 0xFFFF
    packed = [sum(int(v) << (8 * i) for i, v in enumerate(b.tolist()))
              for b in (bits[:4] & 255, bits[4:] & 255, bits[:4] >> 8, bits[4:] >> 8)]
    return tuple(w - (1 << 32) if w >> 31 else w for w in packed)


@lru_cache(maxsize=None)
def hadamard_matrix(n: int, device) -> Tensor:
    """The n x n Hadamard matrix of +-1 (n a power of two), fp32: the layers' rotations here, the polar codec's."""
    return fwht(torch.eye(n)).to(device)


def randomized_hadamard(head_dim: int, seed: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(signs (D,) fp32, H (D, D) fp16 +-1, rotation (D, D) fp32 = diag(signs) H / sqrt(D)): x -> x @ rotation is
    orthogonal, and spreads any channel's outlier over all coordinates."""
    if head_dim & (head_dim - 1):
        raise ValueError(f"tq4 needs a power-of-two head_dim, not {head_dim}")
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (head_dim,), generator=gen, device="cpu").float() * 2 - 1
    h = hadamard_matrix(head_dim, "cpu")
    return signs.to(device), h.half().to(device), (signs[:, None] * h / math.sqrt(head_dim)).to(device)


class TurboQuantMSE:
    """TurboQuant's MSE quantizer (Zandieh et al. 2025) of one layer's head vectors: each vector is rotated by the
    layer's seeded randomized Hadamard transform, so its direction's coordinates are about N(0, 1/D) whatever the
    model's channels do; the direction scaled to unit variance is coded by the 16-level Lloyd-Max codebook of
    N(0, 1), two codes per byte, with one fp16 scale per vector (the least-squares scale of its decoded codes, which
    also restores its norm: about |x| / sqrt(D)). A code is sign and magnitude, as fp16 is: bit 3 set for a negative
    coordinate, bits 0-2 the index of its magnitude among the codebook's 8 positive centroids, so the attention
    kernel decodes it by byte permutes over an 8-entry table. Decoded vectors stay in the rotated basis."""

    def __init__(self, head_dim: int, seed: int, device):
        self.signs, self.hadamard, self.rotation = randomized_hadamard(head_dim, seed, device)
        magnitudes = torch.tensor(tq4_magnitudes(), dtype=torch.float32)
        self.centroids = torch.cat((magnitudes, -magnitudes)).to(device)  # by code
        self.bounds = ((magnitudes[1:] + magnitudes[:-1]) / 2).to(device)  # between consecutive magnitudes
        self.codebook = torch.cat((self.centroids, self.bounds))  # as the write kernel takes it
        self.decoder_tables = torch.tensor(tq4_byte_tables(), dtype=torch.int32).repeat(head_dim // 8, 1).to(device)
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.signs, self.hadamard, self.rotation,
                                                                 self.codebook, self.decoder_tables))

    @classmethod
    def for_cache(cls, cache: "KVCache") -> "TurboQuantMSE":
        """The quantizer of a cache's layer: a rotation of its own, seeded by KV_SEED and the layer index."""
        return cls(cache.head_dim, 7919 * cache.cfg.seed + cache.layer, cache.device)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., D) -> packed codes (..., D // 2) uint8, scale (...,) fp16."""
        return self.encode_rotated(x.float() @ self.rotation)

    def encode_rotated(self, xr: Tensor) -> tuple[Tensor, Tensor]:
        """encode() of a vector already in the rotated basis (fp32)."""
        u = xr * (math.sqrt(xr.shape[-1]) / xr.norm(dim=-1, keepdim=True).clamp_min(1e-30))
        code = torch.bucketize(u.abs(), self.bounds) + 8 * (u < 0)  # the magnitude bounds below |u|, the sign
        c = self.centroids[code]
        scale = (xr * c).sum(-1) / (c * c).sum(-1).clamp_min(1e-30)
        return (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8), scale.half()

    def decode_rotated(self, codes: Tensor, scale: Tensor) -> Tensor:
        return self.centroids[tq4_unpack(codes)] * scale.float()[..., None]


TQ4_VALUE_TILE = 64  # tq4 values' entries a tile


def tq4_tile_bytes(entries: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """Where tq4 value codes sit in their tile of TQ4_VALUE_TILE entries (channel-major, for the attention's dot):
    for entries (E,) of a tile, the byte of each channel's code (E, D) among the tile's 32 D bytes, and the nibble's
    shift (E, 1). A tile holds each channel's codes in 8 int32 words, even channels first; word w holds entries 2w and
    2w + 1 of each of the tile's 4 groups of 16, entry 16 g + 2 w + k at nibble n(2 g + k), where n swaps bits 0 and
    1: the order of the decoder's outputs (TQ4_DECODE_PTX)."""
    order = 2 * (entries // 16) + entries % 2
    nibble = (order & 4) | ((order & 1) << 1) | ((order >> 1) & 1)
    channel = torch.arange(head_dim, device=entries.device)
    row = channel % 2 * (head_dim // 2) + channel // 2
    return 32 * row[None, :] + (entries % 16 // 2 * 4 + nibble // 2)[:, None], 4 * (nibble % 2)[:, None]


def tq4_unpack(codes: Tensor) -> Tensor:
    """Packed tq4 codes (..., D // 2) uint8 -> a code per channel (..., D) int64; channel 2i: byte i's low nibble."""
    return torch.stack(((codes & 15).long(), (codes >> 4).long()), -1).reshape(*codes.shape[:-1], -1)


class RecentExactMixin:
    """A cache over a rotated-basis coder (`mse`) whose newest KV_RECENT_EXACT_TOKENS entries per row are also kept
    exact, in that basis (where the query is), in a ring by position: keys, and values too where `ring_values`.
    A row's positions run on by one from 0 (a repeat rewrites the newest), as the eval's plans feed them, so the
    slots written in the last R steps hold the recent entries, and attention takes those exact. A trained model
    puts most of its attention on the newest few tokens, so their codes carry most of a 4-bit cache's error (on a
    trained artifact tq4 costs +0.0035 bpb, and +0.00003 with its 16 newest entries exact). 0 keeps nothing."""

    ring_values = False  # the values' ring too, not only the keys'
    default_recent: int  # the ring's entries unless KV_RECENT_EXACT_TOKENS says otherwise

    @property
    def recent(self) -> int:
        return self.default_recent if self.cfg.recent_exact_tokens is None else self.cfg.recent_exact_tokens

    @property
    def recent_values(self) -> bool:
        return self.ring_values and self.recent > 0

    def allocate(self):
        super().allocate()
        if self.recent == 0:
            return
        ring = lambda: torch.zeros(self.batch, self.heads, self.recent, self.head_dim, dtype=self.dtype,  # noqa: E731
                                   device=self.device)
        self.buffers["k_recent"] = self.k_recent = ring()
        if self.recent_values:
            self.buffers["v_recent"] = self.v_recent = ring()
        self.buffers["newest"] = self.newest = torch.zeros(self.batch, dtype=torch.int32, device=self.device)

    def append(self, k, v, positions):
        super().append(k, v, positions)
        if self.recent == 0:
            return
        active, pos = positions >= 0, positions.clamp_min(0)
        put_rows(self.k_recent, pos % self.recent, active, k.float() @ self.mse.rotation)
        if self.recent_values:
            put_rows(self.v_recent, pos % self.recent, active, v.float() @ self.mse.rotation)
        self.newest.copy_(torch.where(active, pos, self.newest))

    def ring_slots(self) -> tuple[Tensor, Tensor]:
        """(B, capacity) each: whether a slot holds one of its row's newest entries, and the ring slot of its
        position (a slot's age, the steps since it was written, gives that position)."""
        newest = self.newest[:, None].long()
        age = (newest % self.capacity - torch.arange(self.capacity, device=self.device)) % self.capacity
        return age < self.recent, (newest - age) % self.recent

    def scores(self, q):
        if self.recent == 0:
            return super().scores(q)
        recent, ring = self.ring_slots()
        exact = torch.einsum("bhgd,bhrd->bhgr", q @ self.mse.rotation, self.k_recent.float())
        exact = exact.gather(-1, ring[:, None, None, :].expand(*exact.shape[:-1], -1))
        return torch.where(recent[:, None, None, :], exact, super().scores(q))

    def values(self):
        if not self.recent_values:
            return super().values()
        recent, ring = self.ring_slots()
        exact = (self.v_recent.float() @ self.mse.rotation.T).gather(2, ring[:, None, :, None].expand(
            -1, self.heads, -1, self.head_dim))
        return torch.where(recent[:, None, :, None], exact, super().values())

    def bytes_per_token(self):
        """The codes', plus the rings spread over the capacity."""
        ring = self.heads * self.recent * self.head_dim * torch.finfo(self.dtype).bits // 8 * (1 + self.recent_values)
        return super().bytes_per_token() + -(-ring // self.capacity)


class TurboQuantCache(KVCache):
    """Keys and values coded by TurboQuantMSE (4 bits a coordinate); scores are taken in the rotated basis (the
    query rotated once), and values decode there and rotate back. Keys are stored a row per entry, values in tiles of
    TQ4_VALUE_TILE entries (tq4_tile_bytes; the last tile padded out)."""

    def allocate(self):
        self.mse = TurboQuantMSE.for_cache(self)
        self.extra_bytes = self.mse.nbytes
        self.buffer("k_codes", self.head_dim // 2, dtype=torch.uint8)
        self.buffer("k_scale", dtype=torch.float16)
        tiles = -(-self.capacity // TQ4_VALUE_TILE)
        self.buffer("v_codes", tiles, TQ4_VALUE_TILE * self.head_dim // 2, dtype=torch.uint8, entries=False)
        self.buffer("v_scale", dtype=torch.float16)

    def write(self, k, v, slots, active):
        codes, scale = self.mse.encode(k)
        self.store("k_codes", slots, active, codes)
        self.store("k_scale", slots, active, scale)
        codes, scale = self.mse.encode(v)
        byte, shift = tq4_tile_bytes(slots % TQ4_VALUE_TILE, self.head_dim)  # (B, D), (B, 1)
        rows, heads = torch.arange(self.batch, device=self.device), torch.arange(self.heads, device=self.device)
        at = (rows[:, None, None], heads[None, :, None], (slots // TQ4_VALUE_TILE)[:, None, None], byte[:, None, :])
        old, shift = self.v_codes[at].long(), shift[:, None]  # (B, Hkv, D): the byte of each code
        merged = (old & ~(15 << shift)) | (tq4_unpack(codes) << shift)
        self.v_codes[at] = torch.where(active[:, None, None], merged, old).to(torch.uint8)
        self.store("v_scale", slots, active, scale)

    def value_codes(self) -> Tensor:
        """The values' codes, one per channel (B, Hkv, capacity, D) int64, out of their tiles."""
        byte, shift = tq4_tile_bytes(torch.arange(TQ4_VALUE_TILE, device=self.device), self.head_dim)
        c = (self.v_codes[:, :, :, byte].long() >> shift) & 15  # (B, Hkv, tiles, TQ4_VALUE_TILE, D)
        return c.flatten(2, 3)[:, :, :self.capacity]

    def scores(self, q):
        keys = self.mse.decode_rotated(self.k_codes, self.k_scale)
        return torch.einsum("bhgd,bhnd->bhgn", q @ self.mse.rotation, keys)

    def values(self):
        decoded = self.mse.centroids[self.value_codes()] * self.v_scale.float()[..., None]
        return decoded @ self.mse.rotation.T

    def bytes_per_token(self):
        return 2 * self.heads * (self.head_dim // 2 + 2)


class TQ4Cache(RecentExactMixin, TurboQuantCache):
    """TurboQuant's codes for keys and values, and the newest KV_RECENT_EXACT_TOKENS keys and values kept exact
    (0: TurboQuant alone). 8 by default: +0.00062 bpb at 0.273x bf16's bytes on the int6 stand-in artifact (ring
    eval, 262,144 targets; +0.00461 at 0.266x alone); 14 is the most that stays under 0.28x."""

    name = "tq4"
    ring_values, default_recent = True, 8


class QJLCache(KVCache):
    """TurboQuant's inner-product quantizer for keys: TurboQuantMSE's 4-bit codes, and QJL on what they miss, the
    rotated residual r: sign(S r) (m = KV_QJL_DIM bits, packed 8 per byte) and ||r|| in fp16. The score
    q.k_mse + sqrt(pi/2)/m * ||r|| * <S q, sign(S r)> (q in the rotated basis) is an unbiased estimate of q.k for
    Gaussian S, whose QJL noise scales with the small ||r|| (plain QJL on k: +0.09 bpb on trained weights).
    Values group-quantized to KV_VALUE_BITS."""

    name = "qjl"

    def allocate(self):
        m, g = self.cfg.qjl_dim, self.head_dim // self.cfg.group_size
        self.mse = TurboQuantMSE.for_cache(self)
        self.sketch = qjl_sketch(self.head_dim, m, self.cfg.seed * 1000 + self.layer, self.device)
        self.signs = sign_table(self.device)
        self.extra_bytes = self.mse.nbytes + self.sketch.nbytes + self.signs.nbytes
        self.buffer("k_codes", self.head_dim // 2, dtype=torch.uint8)
        self.buffer("k_scale", dtype=torch.float16)
        self.buffer("k_bits", m // 8, dtype=torch.uint8)
        self.buffer("k_rnorm", dtype=torch.float16)
        width = self.head_dim if self.cfg.value_bits == 8 else self.head_dim // 2
        self.buffer("v_q", width, dtype=torch.int8 if self.cfg.value_bits == 8 else torch.uint8)
        self.buffer("v_s", g, dtype=torch.float16)

    def write(self, k, v, slots, active):
        kr = k.float() @ self.mse.rotation
        codes, scale = self.mse.encode_rotated(kr)
        residual = kr - self.mse.decode_rotated(codes, scale)
        self.store("k_codes", slots, active, codes)
        self.store("k_scale", slots, active, scale)
        self.store("k_bits", slots, active, pack_signs(residual @ self.sketch.float().T))
        self.store("k_rnorm", slots, active, residual.norm(dim=-1).half())
        q, s = group_quantize(v, self.cfg.group_size, self.cfg.value_bits)
        self.store("v_q", slots, active, q if self.cfg.value_bits == 8 else pack_nibbles(q))
        self.store("v_s", slots, active, s)

    def scores(self, q):
        qr = q @ self.mse.rotation
        mse = torch.einsum("bhgd,bhnd->bhgn", qr, self.mse.decode_rotated(self.k_codes, self.k_scale))
        sketched = torch.einsum("bhgm,bhnm->bhgn", qr @ self.sketch.float().T, unpack_signs(self.k_bits))
        return mse + sketched * (math.sqrt(math.pi / 2) / self.cfg.qjl_dim) * self.k_rnorm.float()[:, :, None, :]

    def values(self):
        q = self.v_q if self.cfg.value_bits == 8 else unpack_nibbles(self.v_q)
        return group_dequantize(q, self.v_s, self.cfg.group_size)

    def bytes_per_token(self):
        value_bytes = self.head_dim * self.cfg.value_bits // 8 + 2 * self.head_dim // self.cfg.group_size
        return self.heads * (self.head_dim // 2 + 2 + self.cfg.qjl_dim // 8 + 2 + value_bytes)


class QJLRecentKCache(RecentExactMixin, QJLCache):
    """qjl, except the newest KV_RECENT_EXACT_TOKENS keys, which are scored exactly (RecentExactMixin). 6 by
    default, the most that keeps it within the QJL backends' 0.30x bf16's bytes (0.2998x; +0.00680 bpb on the int6
    stand-in artifact, ring eval, 262,144 targets; 8 gave +0.00625 at 0.3008x)."""

    name, default_recent = "qjl_recentk", 6


# -----------------------------------------------------------------------------
# Triton kernels. Codecs are named constexprs, a branch each; a codec a kernel does not know fails its
# compilation (tl.static_assert), never falls through to another's path.
#   keys:   "exact" (the cache's dtype), "int8" (groups, fp16 scales), "tq4" (rotated, 4-bit Lloyd-Max codes
#           two per byte, fp16 scale), "qjl" (tq4, plus the sign bits of the sketched residual and its fp16 norm)
#   values: "exact", "int8", "int4" (groups, fp16 scales), "tq4"
# -----------------------------------------------------------------------------

if triton is not None:

    TQ4_TILE = tl.constexpr(TQ4_VALUE_TILE)

    @triton.jit
    def _store_groups(x, q_ptr, s_ptr, entry, live, GROUP: tl.constexpr, BITS: tl.constexpr):
        """x (R, D) fp32 rows stored at the rows' cache entries (R,) where live (R,) is set: symmetric codes
        (round half up) of BITS (8 or 4) bits with fp16 scales per GROUP channels; 4-bit codes two per byte."""
        R: tl.constexpr = x.shape[0]
        D: tl.constexpr = x.shape[1]
        width: tl.constexpr = D // 2 if BITS == 4 else D
        offs = tl.arange(0, width)
        mask = live[:, None] & (offs < width)[None, :]
        QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
        xg = tl.reshape(x, (R, D // GROUP, GROUP))
        scale = tl.maximum(tl.max(tl.abs(xg), axis=2) / QMAX, 2.0 ** -24).to(tl.float16).to(tl.float32)
        q = tl.reshape(tl.minimum(tl.maximum(tl.floor(xg / scale[:, :, None] + 0.5), -QMAX), QMAX), (R, D))
        if BITS == 8:
            tl.store(q_ptr + entry[:, None] * D + offs[None, :], q.to(tl.int8), mask=mask)
        else:
            lo, hi = tl.split(tl.reshape((q + 8).to(tl.int32), (R, D // 2, 2)))
            tl.store(q_ptr + entry[:, None] * width + offs[None, :], (lo | (hi << 4)).to(tl.uint8), mask=mask)
        offs_g = tl.arange(0, D // GROUP)
        tl.store(s_ptr + entry[:, None] * (D // GROUP) + offs_g[None, :], scale.to(tl.float16),
                 mask=live[:, None] & (offs_g < D // GROUP)[None, :])

    @triton.jit
    def _rotate(x, signs, h):
        """x (R, D) fp32 rows -> x in the layer's rotated basis, (x * signs) H / sqrt(D): two fp16 tensor-core dots
        (x's fp16 high and low parts) against H (D, D), whose +-1 entries fp16 holds exactly: about fp32 accuracy."""
        D: tl.constexpr = x.shape[1]
        xs = x * signs[None, :]
        high = xs.to(tl.float16)
        return (tl.dot(high, h) + tl.dot((xs - high.to(tl.float32)).to(tl.float16), h)) * (1.0 / tl.sqrt(D * 1.0))

    @triton.jit
    def _tq4_codes(x, codebook_ptr):
        """x (R, D) rotated rows -> (codes (R, D) int32, scales (R,) fp32 as fp16 rounds them, the rows as decoded):
        each row's direction x / |x| * sqrt(D), about N(0, 1) per coordinate, coded by the 16-level Lloyd-Max codebook
        of N(0, 1) in sign and magnitude (TurboQuantMSE; codebook: the 16 centroids by code, then the 7 bounds between
        magnitudes), and the row's least-squares scale <x, c> / <c, c> of its decoded codes c."""
        D: tl.constexpr = x.shape[1]
        u = x * (tl.sqrt(D * 1.0) / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-30))[:, None]
        code = tl.where(u < 0, 8, 0)
        for j in tl.static_range(7):
            code += (tl.abs(u) > tl.load(codebook_ptr + 16 + j)).to(tl.int32)
        c = tl.load(codebook_ptr + code)
        scale = (tl.sum(x * c, axis=1) / tl.maximum(tl.sum(c * c, axis=1), 1e-30)).to(tl.float16).to(tl.float32)
        return code, scale, c * scale[:, None]

    @triton.jit
    def _store_tq4(x, q_ptr, s_ptr, codebook_ptr, entry, live):
        """x (R, D) rotated rows coded (_tq4_codes) at their entries where live: channels 2i and 2i + 1 as the low and
        high nibble of byte i, and the scale in fp16. -> the rows as decoded (R, D)."""
        R: tl.constexpr = x.shape[0]
        D: tl.constexpr = x.shape[1]
        code, scale, decoded = _tq4_codes(x, codebook_ptr)
        lo, hi = tl.split(tl.reshape(code, (R, D // 2, 2)))
        offs = tl.arange(0, D // 2)
        tl.store(q_ptr + entry[:, None] * (D // 2) + offs[None, :], (lo | (hi << 4)).to(tl.uint8),
                 mask=live[:, None] & (offs < D // 2)[None, :])
        tl.store(s_ptr + entry, scale.to(tl.float16), mask=live)
        return decoded

    @triton.jit
    def _read_tq4_tiles(q_ptr, entry, live, D: tl.constexpr):
        """The bytes of their tiles (TQ4_TILE, tq4_tile_bytes) that value entries (R,) code into: a nibble of a byte
        that another entry's code shares. -> (each channel's byte offset (R, D), its nibble's shift (R, 1), the bytes
        less those nibbles (R, D) int32) for _store_tq4_tiles; read with the program's other loads, before its first
        store, which could alias them (read after the codes, they issued at the end of the sm_90 build)."""
        e = entry % TQ4_TILE
        order = 2 * (e // 16) + e % 2  # the decoder's output that holds the entry, at this nibble:
        nibble = (order & 4) | ((order & 1) << 1) | ((order >> 1) & 1)  # bits 0 and 1 swapped
        channel = tl.arange(0, D)
        row = channel % 2 * (D // 2) + channel // 2  # even channels first
        byte = ((entry - e) * (D // 2) + e % 16 // 2 * 4 + nibble // 2)[:, None] + (32 * row)[None, :]
        shift = (4 * (nibble % 2))[:, None]
        kept = tl.load(q_ptr + byte, mask=tl.broadcast_to(live[:, None], byte.shape), other=0).to(tl.int32)
        return byte, shift, kept & ~(15 << shift)

    @triton.jit
    def _store_tq4_tiles(x, q_ptr, s_ptr, codebook_ptr, entry, live, tiles):
        """x (R, D) rotated value rows coded (_tq4_codes) into their tiles: each code merged into its byte as read
        (tiles: _read_tq4_tiles); the scale in fp16."""
        code, scale, _ = _tq4_codes(x, codebook_ptr)
        byte, shift, kept = tiles
        tl.store(q_ptr + byte, (kept | (code << shift)).to(tl.uint8), mask=tl.broadcast_to(live[:, None], code.shape))
        tl.store(s_ptr + entry, scale.to(tl.float16), mask=live)

    @triton.jit
    def _rows(x, first: tl.constexpr, R: tl.constexpr):
        """Rows first .. first + R - 1 of x (N, D) (first a multiple of R; N and R powers of two), as a tile of its
        own: a tile's few key or value rows, so the coder runs on them and not on the query rows and padding a
        tensor-core dot needs. The tile's blocks of R rows go to a last axis, halved by splits down to the block
        wanted: each thread then holds its share of the R rows (tl.gather's tile is replicated over the threads
        that held the other rows: 4 times, for 4 rows of 16)."""
        N: tl.constexpr = x.shape[0]
        D: tl.constexpr = x.shape[1]
        tl.static_assert(first % R == 0, "_rows takes a block of R rows")
        t = tl.permute(tl.reshape(x, (N // R, R, D)), (1, 2, 0))
        for level in tl.static_range(N):  # log2(N // R) of them split: the block index's bit `level` picks a half
            if (N // R) >> level > 1:
                low, high = tl.split(tl.reshape(t, (R, D, (N // R) >> (level + 1), 2)))
                if (first // R >> level) & 1:
                    t = high
                else:
                    t = low
        return tl.reshape(t, (R, D))

    @triton.jit
    def _store_codes(x, q_ptr, s_ptr, codebook_ptr, entry, live, CODEC: tl.constexpr, GROUP: tl.constexpr):
        """Rows x (R, D) fp32 (already rotated for tq4) written in CODEC at their entries where live."""
        D: tl.constexpr = x.shape[1]
        if CODEC == "exact":
            offs = tl.arange(0, D)
            tl.store(q_ptr + entry[:, None] * D + offs[None, :], x.to(q_ptr.dtype.element_ty),
                     mask=live[:, None] & (offs < D)[None, :])
        elif CODEC == "int8":
            _store_groups(x, q_ptr, s_ptr, entry, live, GROUP, 8)
        elif CODEC == "int4":
            _store_groups(x, q_ptr, s_ptr, entry, live, GROUP, 4)
        else:
            tl.static_assert(CODEC == "tq4", "unknown codec: exact, int8, int4 or tq4")
            _store_tq4(x, q_ptr, s_ptr, codebook_ptr, entry, live)

    @triton.jit
    def _sketch(x, sketch_ptr, M: tl.constexpr):
        """x (R, D) fp32 rows -> S x (R, M) fp32 by two fp16 tensor-core dots (x split into its fp16 high and
        low parts) against the sketch S (M, D), fp16 and small (it stays in L2): about fp32 accuracy."""
        D: tl.constexpr = x.shape[1]
        sketch = tl.trans(tl.load(sketch_ptr + tl.arange(0, M)[:, None] * D + tl.arange(0, D)[None, :]))
        high = x.to(tl.float16)
        return tl.dot(high, sketch) + tl.dot((x - high.to(tl.float32)).to(tl.float16), sketch)

    @triton.jit
    def _kv_write_kernel(x_ptr, v_ptr, q_out_ptr, pos_ptr, pos_stride, len_ptr, inv_freq_ptr, gain_ptr,
                         kq_ptr, ks_ptr, kbits_ptr, krnorm_ptr, krecent_ptr, vrecent_ptr, newest_ptr,
                         vq_ptr, vs_ptr, sketch_ptr, rot_signs_ptr, hadamard_ptr, codebook_ptr,
                         row_stride, CAP, eps, PROLOGUE: tl.constexpr, HQ: tl.constexpr, H: tl.constexpr,
                         HG: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, KEY: tl.constexpr,
                         VALUE: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr,
                         RECENT: tl.constexpr, RECENT_VALUES: tl.constexpr):
        """Program (row, group of HG KV heads): code the row's new K and V of those heads, write them at slot
        position % CAP, and set the row's filled length. x holds the H keys, or with PROLOGUE the row's fused QKV
        projection: then the group's query heads and keys are RMS-normed and rotated at the row's position first,
        and the query heads, scaled by their gains, are stored to q_out in the form the attention kernel takes
        (for tq4 and qjl keys: in the layer's rotated basis). qjl keys are tq4 codes plus the sign bits of the
        sketched residual and its norm. With RECENT, the rotated key (and with RECENT_VALUES the rotated value)
        also goes to a ring of the RECENT newest, and the row's newest position is kept. One tile holds the
        group's query heads, keys and values: a sketch or rotation matrix is loaded once per program and applied by
        tensor-core dots over all of it (tq4 values rotate with the keys, others keep their rows); the keys and the
        values are then coded as BLOCK_K rows of their own, not with the tile's other rows and padding. A row whose
        position is negative is inactive: nothing of it is written."""
        b, h0 = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64) * HG
        pos = tl.load(pos_ptr + b * pos_stride).to(tl.int64)
        slot = tl.maximum(pos, 0) % CAP
        ring_slot = tl.maximum(pos, 0) % RECENT if RECENT > 0 else 0
        G: tl.constexpr = HQ // H
        NQ: tl.constexpr = HG * G if PROLOGUE else 0  # the tile's rows: NQ query heads, HG keys from K0, HG values from V0
        K0: tl.constexpr = (NQ + BLOCK_K - 1) // BLOCK_K * BLOCK_K
        V0: tl.constexpr = K0 + BLOCK_K
        KEY_ROTATES: tl.constexpr = (KEY == "tq4") | (KEY == "qjl")
        tl.static_assert(KEY_ROTATES | (VALUE != "tq4"), "tq4 values rotate with the keys: their codec must rotate")
        BLOCK_R: tl.constexpr = 16 if KEY_ROTATES and ROWS < 16 else ROWS  # a tensor-core dot over them needs 16 rows
        rows, offs = tl.arange(0, BLOCK_R), tl.arange(0, D)
        is_query = rows < NQ
        in_keys = (rows >= K0) & (rows < K0 + HG)
        is_value = (rows >= V0) & (rows < V0 + HG)
        is_key = in_keys & (rows * 0 + pos >= 0)  # an inactive row writes no key
        q_head, k_head = h0 * G + rows, h0 + rows - K0
        x_head = tl.where(is_query, q_head, (HQ if PROLOGUE else 0) + k_head)  # where the head sits in x
        ptrs = tl.where(is_value, v_ptr + b * row_stride + (h0 + rows - V0) * D, x_ptr + b * row_stride + x_head * D)
        in_tile = (is_query | in_keys | is_value)[:, None]
        x = tl.load(ptrs[:, None] + offs[None, :], mask=in_tile, other=0).to(tl.float32)
        head = tl.arange(0, BLOCK_K)  # the group's KV heads, a row each in the tiles of its keys and its values
        live = (head < HG) & (head * 0 + pos >= 0)
        entry = (b * H + h0 + head) * CAP + slot
        signs, hadamard, tiles = 0, 0, 0  # read by rotating codecs, and tq4 values, only
        if KEY_ROTATES:  # every load of the program before its first store, which the loads could alias
            signs = tl.load(rot_signs_ptr + offs)
            hadamard = tl.load(hadamard_ptr + offs[:, None] * D + offs[None, :])
        if VALUE == "tq4":
            tiles = _read_tq4_tiles(vq_ptr, entry, live, D)
        if PROLOGUE:  # queries and keys: RMS norm, rotary at the row's position, the queries' gains
            HALF: tl.constexpr = D // 2
            partner = tl.load(ptrs[:, None] + ((offs + HALF) % D)[None, :], mask=(is_query | in_keys)[:, None],
                              other=0).to(tl.float32)
            freq = pos.to(tl.float32) * tl.load(inv_freq_ptr + offs % HALF)
            out_ty = x_ptr.dtype.element_ty  # cos and sin rounded to the compute dtype, as the model does
            cos = tl.cos(freq).to(out_ty).to(tl.float32)
            sin = tl.sin(freq).to(out_ty).to(tl.float32) * tl.where(offs < HALF, 1.0, -1.0)
            inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
            normed = (x * cos[None, :] + partner * sin[None, :]) * inv_rms[:, None]
            normed = normed * tl.load(gain_ptr + q_head, mask=is_query, other=1.0).to(tl.float32)[:, None]
            x = tl.where(is_value[:, None], x, normed)
        if KEY_ROTATES:
            rotated = _rotate(x, signs, hadamard)
            x = rotated if VALUE == "tq4" else tl.where(is_value[:, None], x, rotated)
        if KEY == "qjl":  # on the whole tile: the sketch is a tensor-core dot
            tile_entry = (b * H + k_head) * CAP + slot
            residual = x - _store_tq4(x, kq_ptr, ks_ptr, codebook_ptr, tile_entry, is_key)
            sx = _sketch(residual, sketch_ptr, M)
            bits = tl.reshape((sx >= 0).to(tl.int32), (BLOCK_R, M // 8, 8)) << tl.arange(0, 8)[None, None, :]
            offs_b = tl.arange(0, M // 8)
            tl.store(kbits_ptr + tile_entry[:, None] * (M // 8) + offs_b[None, :], tl.sum(bits, axis=2).to(tl.uint8),
                     mask=is_key[:, None] & (offs_b < M // 8)[None, :])
            tl.store(krnorm_ptr + tile_entry, tl.sqrt(tl.sum(residual * residual, axis=1)).to(tl.float16), mask=is_key)
        ring = (b * H + h0 + head) * RECENT + ring_slot
        keys, values = _rows(x, K0, BLOCK_K), _rows(x, V0, BLOCK_K)
        if KEY != "qjl":
            _store_codes(keys, kq_ptr, ks_ptr, codebook_ptr, entry, live, KEY, GROUP)
        if RECENT > 0:
            tl.store(krecent_ptr + ring[:, None] * D + offs[None, :], keys.to(krecent_ptr.dtype.element_ty),
                     mask=live[:, None])
        if PROLOGUE:
            tl.store(q_out_ptr + (b * HQ + q_head)[:, None] * D + offs[None, :], x.to(q_out_ptr.dtype.element_ty),
                     mask=is_query[:, None])
        if RECENT_VALUES:
            tl.store(vrecent_ptr + ring[:, None] * D + offs[None, :], values.to(vrecent_ptr.dtype.element_ty),
                     mask=live[:, None])
        if VALUE == "tq4":
            _store_tq4_tiles(values, vq_ptr, vs_ptr, codebook_ptr, entry, live, tiles)
        else:
            _store_codes(values, vq_ptr, vs_ptr, codebook_ptr, entry, live, VALUE, GROUP)
        tl.store(len_ptr + b, tl.minimum(pos + 1, CAP).to(tl.int32), mask=(pos >= 0) & (h0 == 0))
        if RECENT > 0:
            tl.store(newest_ptr + b, pos.to(tl.int32), mask=(pos >= 0) & (h0 == 0))

    FP16_1024 = tl.constexpr(0x6400)  # the fp16 bit pattern of 1024.0, whose low bits count by 1

    @triton.jit
    def _fp16_bits(pattern):
        """int32 holding fp16 bit patterns -> fp16: integer ops instead of int-to-float conversions, which
        run at a fraction of the ALU rate and would bound the 4-bit decoder."""
        return pattern.to(tl.int16).to(tl.float16, bitcast=True)

    # The interpreter runs no PTX: there the int8 decoder takes plain integer ops, to the same fp16 values.
    INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

    INT8_DECODE_PTX = tl.constexpr(
        "{ .reg .b32 u, even, odd; xor.b32 u, $4, 0x80808080; prmt.b32 even, u, 0x64646464, 0x4240; "
        "prmt.b32 odd, u, 0x64646464, 0x4341; mov.b32 {$0, $1}, even; mov.b32 {$2, $3}, odd; }")

    @triton.jit
    def _int8_halves(ptr, entry, nmask, D: tl.constexpr):
        """A block of int8 code rows, read as int32 words, decoded in registers as its even and its odd channels, two
        (BLOCK_N, D // 2) fp16 tiles (as _tq4_halves). On the GPU one xor and two byte permutes per word set the
        fp16 bit patterns of 1024 + (c + 128), two to a register, less 1152. Decoding code by code (sign extension,
        add, repack) and the layout moves it forced took the attention loop to 1,088 instructions per thread per 64
        entries, against 624 (benchmarks/attend_sass.py), and bound the int8 cache at full cache and batch 1024."""
        tl.static_assert(D % 4 == 0, "int8 rows are read as int32 words: head_dim must be a multiple of 4")
        N: tl.constexpr = entry.shape[0]
        words = tl.load(ptr.to(tl.pointer_type(tl.int32)) + entry[:, None] * (D // 4) + tl.arange(0, D // 4)[None, :],
                        mask=nmask[:, None], other=0)
        if INTERPRETED:
            byte = ((words[:, :, None] >> (8 * tl.arange(0, 4))[None, None, :]) & 0xFF) ^ 0x80
            even, odd = tl.split(tl.reshape(byte.to(tl.float16) - 128.0, (N, D // 4, 2, 2)))  # bytes 0, 2 and 1, 3
            return tl.reshape(even, (N, D // 2)), tl.reshape(odd, (N, D // 2))
        c0, c2, c1, c3 = tl.inline_asm_elementwise(INT8_DECODE_PTX, "=h,=h,=h,=h,r", [words], dtype=(tl.float16,) * 4,
                                                   is_pure=True, pack=1)
        return tl.reshape(tl.join(c0, c2), (N, D // 2)) - 1152.0, tl.reshape(tl.join(c1, c3), (N, D // 2)) - 1152.0

    @triton.jit
    def _even_odd_halves(x):
        """(R, D) -> its even and its odd channels, each (R, D // 2)."""
        return tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))

    # Eight codes (a word's nibbles) -> eight fp16 values in about two instructions a code, no table loads in the
    # loop: a byte permute over two table registers ($9-$12, tq4_byte_tables) looks up 4 magnitudes' low bytes (the
    # selector: the codes less their sign bits), another their high bytes, a third spreads the 4 sign bits (from the
    # word and the word << 4, whose bytes' top bits they are) over the high bytes, and two more interleave low and
    # high bytes into fp16 pairs of channels 8w + k and 8w + k + 2, the pairs the even and odd tiles hold in a
    # register (no repacking after).
    TQ4_DECODE_PTX = tl.constexpr(
        "{ .reg .b32 m, t, lo, hi, sg, pair; "
        "and.b32 m, $8, 0x77777777; shl.b32 t, $8, 4; "
        "prmt.b32 lo, $9, $10, m; prmt.b32 hi, $11, $12, m; prmt.b32 sg, t, $8, 0xD9C8; "
        "and.b32 sg, sg, 0x80808080; or.b32 hi, hi, sg; "
        "prmt.b32 pair, lo, hi, 0x6240; mov.b32 {$0, $1}, pair; "
        "prmt.b32 pair, lo, hi, 0x7351; mov.b32 {$2, $3}, pair; "
        "shr.b32 m, m, 16; "
        "prmt.b32 lo, $9, $10, m; prmt.b32 hi, $11, $12, m; prmt.b32 sg, t, $8, 0xFBEA; "
        "and.b32 sg, sg, 0x80808080; or.b32 hi, hi, sg; "
        "prmt.b32 pair, lo, hi, 0x6240; mov.b32 {$4, $5}, pair; "
        "prmt.b32 pair, lo, hi, 0x7351; mov.b32 {$6, $7}, pair; }")

    @triton.jit
    def _entry_fp16(ptr, entry, nmask):
        """The fp16 value (N,) of each cache entry of a per-entry buffer, read as the int32 word holding it: a 4-byte
        load, which the loop's pipeline prefetches (cp.async) with the codes; a 2-byte load is left in the loop, its
        latency in each iteration's path. tq4's scales so took its attention from 188.9 to 170.1 us at ctx 16384 x
        batch 64 on one H200, where cutting 18% of the loop's instructions had moved it by 2%."""
        word = tl.load(ptr.to(tl.pointer_type(tl.int32)) + entry // 2, mask=nmask, other=0)
        return _fp16_bits(tl.where((entry & 1) == 1, word >> 16, word))

    @triton.jit
    def _tq4_tables(ptr, COLUMNS: tl.constexpr, D: tl.constexpr):
        """tq4's four byte-permute tables (tq4_byte_tables) for tiles of COLUMNS word columns, (1, COLUMNS) each,
        loaded once per program from a copy per word column (D // 8, 4; columns past D // 8 read them again):
        registers of their own, which the loop's permutes read in place. As constants (or loads of
        one address) the compiler kept them in uniform registers and copied one into a register before each permute,
        64 of the loop's 719 instructions per thread per 64 entries (benchmarks/attend_sass.py)."""
        column = tl.arange(0, COLUMNS)[None, :] % (D // 8) * 4
        return tl.load(ptr + column), tl.load(ptr + column + 1), tl.load(ptr + column + 2), tl.load(ptr + column + 3)

    @triton.jit
    def _tq4_value(word, tables):
        """The fp16 value of the tq4 code in a word's low nibble, from the byte tables the PTX permutes (the
        interpreter's path)."""
        magnitude = word & 7
        shift = 8 * (magnitude & 3)
        low = tl.where(magnitude < 4, tables[0] >> shift, tables[1] >> shift) & 0xFF
        high = tl.where(magnitude < 4, tables[2] >> shift, tables[3] >> shift) & 0xFF
        return _fp16_bits(low | (high << 8) | ((word & 8) << 12))

    @triton.jit
    def _tq4_decode(words, tables):
        """int32 words of 8 tq4 codes -> 8 tiles of the words' shape, fp16: the centroids of the codes at nibbles 0,
        2, 1, 3, 4, 6, 5, 7 (the PTX's register pairs), from the byte tables (_tq4_tables) of the words' columns."""
        if INTERPRETED:
            c = (_tq4_value(words, tables), _tq4_value(words >> 8, tables), _tq4_value(words >> 4, tables),
                 _tq4_value(words >> 12, tables), _tq4_value(words >> 16, tables), _tq4_value(words >> 24, tables),
                 _tq4_value(words >> 20, tables), _tq4_value(words >> 28, tables))
        else:
            shape: tl.constexpr = words.shape
            c = tl.inline_asm_elementwise(TQ4_DECODE_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r",
                                          [words, tl.broadcast_to(tables[0], shape), tl.broadcast_to(tables[1], shape),
                                           tl.broadcast_to(tables[2], shape), tl.broadcast_to(tables[3], shape)],
                                          dtype=(tl.float16,) * 8, is_pure=True, pack=1)
        return c

    @triton.jit
    def _tq4_halves(q_ptr, s_ptr, entry, nmask, tables, D: tl.constexpr):
        """A block of tq4 rows (keys), read as int32 words of 8 codes, decoded in registers as even and odd channels
        (BLOCK_N, D // 2) fp16, times each row's scale. Looking each code up in a 16-entry table in memory took one
        load a code, 134 of the loop's 1,336 instructions per thread per 64 entries (benchmarks/attend_sass.py), and
        bound tq4 at 12% of copy bandwidth. Scaling the scores instead (a multiply an entry, not one per channel pair)
        builds to as many instructions (464 against 463 an entry at the bandwidth launch: register moves)."""
        tl.static_assert(D % 8 == 0, "tq4 rows are read as int32 words: head_dim must be a multiple of 8")
        N: tl.constexpr = entry.shape[0]
        words = tl.load(q_ptr.to(tl.pointer_type(tl.int32)) + entry[:, None] * (D // 8) + tl.arange(0, D // 8)[None, :],
                        mask=nmask[:, None], other=0)
        c = _tq4_decode(words, tables)
        scale = _entry_fp16(s_ptr, entry, nmask)[:, None]
        # c holds channels 8w + 0, 2, 1, 3, 4, 6, 5, 7 of word w (the PTX's register pairs): the even ones c[0, 1, 4, 5]
        even = tl.reshape(tl.join(tl.join(c[0], c[4]), tl.join(c[1], c[5])), (N, D // 2))
        odd = tl.reshape(tl.join(tl.join(c[2], c[6]), tl.join(c[3], c[7])), (N, D // 2))
        return even * scale, odd * scale

    @triton.jit
    def _key_scores(q, kq_ptr, ks_ptr, kbits_ptr, krnorm_ptr, sign_table_ptr, entry, nmask, tables,
                    KEY: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr):
        """Scores (BLOCK_N, BLOCK_H) of a block of cached keys decoded in registers against q, by tensor-core dots
        with the keys as the first operand (the query heads, padded to 8, are the dots' N: an m16n8 tile has no
        padding rows, and the softmax runs over half the values of a (16, BLOCK_N) score tile). q arrives
        transposed. exact keys: q in the keys' dtype; int8: q as fp16 even and odd channel halves (the decoder's tiles);
        tq4: those halves of q in the rotated basis. qjl: those halves and S q's halves (_nibble_halves, fp16): the
        tq4 score plus the residual's, sqrt(pi/2) / M * |r| * <S q, sign(S r)>, whose signs are looked up a nibble
        at a time in the 128-byte fp16 sign table (L1-resident, one 8-byte load each), not unpacked bit by bit."""
        if KEY == "exact":
            k = tl.load(kq_ptr + entry[:, None] * D + tl.arange(0, D)[None, :], mask=nmask[:, None], other=0)
            score = tl.dot(k, q)
        else:
            if KEY == "int8":
                k_even, k_odd = _int8_halves(kq_ptr, entry, nmask, D)
                k_even, k_odd = _scale_halves(k_even, k_odd, ks_ptr, entry, nmask, GROUP)
            else:
                tl.static_assert((KEY == "tq4") | (KEY == "qjl"), "unknown key codec: exact, int8, tq4 or qjl")
                k_even, k_odd = _tq4_halves(kq_ptr, ks_ptr, entry, nmask, tables, D)
            score = tl.dot(k_even, q[0]) + tl.dot(k_odd, q[1])
        if KEY == "qjl":
            sq_low, sq_high = q[2], q[3]
            byte = tl.load(kbits_ptr + entry[:, None] * (M // 8) + tl.arange(0, M // 8)[None, :], mask=nmask[:, None],
                           other=0).to(tl.int32)
            lane = tl.arange(0, 4)[None, None, :]
            shape: tl.constexpr = (entry.shape[0], M // 2)
            low = tl.reshape(tl.load(sign_table_ptr + (byte & 15)[:, :, None] * 4 + lane), shape)
            high = tl.reshape(tl.load(sign_table_ptr + (byte >> 4)[:, :, None] * 4 + lane), shape)
            sketched = tl.dot(low, sq_low) + tl.dot(high, sq_high)
            rnorm = _entry_fp16(krnorm_ptr, entry, nmask).to(tl.float32)
            score += sketched * (rnorm[:, None] * (1.2533141373155003 / M))
        return score

    @triton.jit
    def _scale_halves(even, odd, s_ptr, entry, nmask, GROUP: tl.constexpr):
        """Even and odd channel halves (N, D // 2) of group-quantized codes times their entries' per-group scales
        (channels 2i and 2i + 1 share group 2i // GROUP), each scale loaded once (N, D // GROUP)."""
        N: tl.constexpr = even.shape[0]
        D: tl.constexpr = 2 * even.shape[1]
        scale = tl.load(s_ptr + entry[:, None] * (D // GROUP) + tl.arange(0, D // GROUP)[None, :], mask=nmask[:, None],
                        other=0)[:, :, None]
        shape: tl.constexpr = (N, D // GROUP, GROUP // 2)
        return (tl.reshape(tl.reshape(even, shape) * scale, (N, D // 2)),
                tl.reshape(tl.reshape(odd, shape) * scale, (N, D // 2)))

    @triton.jit
    def _tq4_value_groups(vq_ptr, vs_ptr, tile_word, entry, nmask, tables, D: tl.constexpr):
        """tq4 values of a block of whole tiles (tq4_tile_bytes), decoded in registers as 4 groups of its even and of
        its odd channels transposed, each (D // 2, N // 4) fp16 (group g: entries 16 g .. 16 g + 15 of each tile), and
        the entries' scales (N, 1) fp32 for their probabilities. tile_word (N // 8,): the first word of each word
        column's tile. A thread of a tensor-core dot holds of a channel's row of its first operand (m16n8k16) entries
        2t, 2t + 1, 2t + 8 and 2t + 9 of a group: words t and t + 4 of the tile. So a group's decoded tile is that
        operand as it stands, and the values reach their dot with no trip through shared memory: a decoded row of
        entries went through it, with bank conflicts (Nsight Compute, benchmarks/kv_history.md)."""
        N: tl.constexpr = entry.shape[0]
        tl.static_assert(N % TQ4_TILE == 0, "tq4 values are read in whole tiles of 64 entries")
        words = vq_ptr.to(tl.pointer_type(tl.int32)) + (tile_word + tl.arange(0, N // 8) % 8)[None, :]
        rows = 8 * tl.arange(0, D // 2)[:, None]
        even = _tq4_decode(tl.load(words + rows), tables)
        odd = _tq4_decode(tl.load(words + rows + 4 * D), tables)
        shape: tl.constexpr = (D // 2, N // 4)
        # decoded c[2g + kl] holds entry 16 g + 2 w + kl of word w's tile
        even = (tl.reshape(tl.join(even[0], even[1]), shape), tl.reshape(tl.join(even[2], even[3]), shape),
                tl.reshape(tl.join(even[4], even[5]), shape), tl.reshape(tl.join(even[6], even[7]), shape))
        odd = (tl.reshape(tl.join(odd[0], odd[1]), shape), tl.reshape(tl.join(odd[2], odd[3]), shape),
               tl.reshape(tl.join(odd[4], odd[5]), shape), tl.reshape(tl.join(odd[6], odd[7]), shape))
        return even, odd, _entry_fp16(vs_ptr, entry, nmask).to(tl.float32)[:, None]

    @triton.jit
    def _value_halves(vq_ptr, vs_ptr, entry, tile_word, nmask, tables, VALUE: tl.constexpr, D: tl.constexpr,
                      GROUP: tl.constexpr):
        """A block of cached values decoded in registers as its even and its odd channels, transposed: tuples of
        (D // 2, entries) fp16 tiles, one per group of the block's entries (_probability_groups), and a factor for the
        probabilities' rows (tq4: the entries' scales; else 1). 4-bit codes are the low and the high nibbles of each
        byte as stored, so the decoder never interleaves them back (that went through shared memory)."""
        p_scale = 1.0
        if VALUE == "tq4":  # (no early return: the compiler would still compile the code after it)
            even_t, odd_t, p_scale = _tq4_value_groups(vq_ptr, vs_ptr, tile_word, entry, nmask, tables, D)
        else:
            if VALUE == "int4":
                byte = tl.load(vq_ptr + entry[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :],
                               mask=nmask[:, None], other=0).to(tl.int32)
                even = _fp16_bits((byte & 15) | FP16_1024) - 1032.0  # 1024 + n - 1032 = n - 8, exact
                odd = _fp16_bits((byte >> 4) | FP16_1024) - 1032.0
            elif VALUE == "int8":
                even, odd = _int8_halves(vq_ptr, entry, nmask, D)
            else:
                tl.static_assert(VALUE == "exact", "unknown value codec: exact, int8, int4 or tq4")
                v = tl.load(vq_ptr + entry[:, None] * D + tl.arange(0, D)[None, :], mask=nmask[:, None], other=0)
                even, odd = _even_odd_halves(v.to(tl.float16))
            if (VALUE == "int8") | (VALUE == "int4"):
                even, odd = _scale_halves(even, odd, vs_ptr, entry, nmask, GROUP)
            even_t, odd_t = (tl.trans(even.to(tl.float16)),), (tl.trans(odd.to(tl.float16)),)
        return even_t, odd_t, p_scale

    @triton.jit
    def _probability_groups(p, GROUPS: tl.constexpr):
        """Probabilities (N, BLOCK_H) -> GROUPS tiles (N // GROUPS, BLOCK_H): 1, p; 4, the rows of each tile's groups
        of 16 (_tq4_value_groups), taken apart in registers (a score tile's rows 16 apart are a thread's)."""
        if GROUPS == 1:
            groups = (p,)
        else:
            tl.static_assert(GROUPS == 4, "probabilities go to 1 group or to tq4's 4")
            N: tl.constexpr = p.shape[0]
            H: tl.constexpr = p.shape[1]
            x = tl.permute(tl.reshape(p, (N // TQ4_TILE, 4, 16, H)), (0, 2, 3, 1))
            low, high = tl.split(tl.reshape(x, (N // 4, H, 2, 2)))  # group bit 0; then bit 1
            g0, g2 = tl.split(low)
            g1, g3 = tl.split(high)
            groups = (g0, g1, g2, g3)
        return groups

    @triton.jit
    def _nibble_halves(codes):
        """Sketch coordinates (R, M) -> those under the low and those under the high nibble of each byte of packed
        sign bits (bit j of byte i is coordinate 8i + j), each (R, M // 2) in the order the key decoder emits them."""
        R: tl.constexpr = codes.shape[0]
        M: tl.constexpr = codes.shape[1]
        low, high = tl.split(tl.permute(tl.reshape(codes, (R, M // 8, 2, 4)), (0, 1, 3, 2)))
        return tl.reshape(low, (R, M // 2)), tl.reshape(high, (R, M // 2))

    @triton.jit
    def _store_even_odd(row_ptrs, even, odd, mask):
        """Rows of even and odd channels (R, D // 2), fp32, stored at row_ptrs (R, 1) in the pointee's dtype."""
        channel = 2 * tl.arange(0, even.shape[1])[None, :]
        ty = row_ptrs.dtype.element_ty
        tl.store(row_ptrs + channel, even.to(ty), mask=mask)
        tl.store(row_ptrs + channel + 1, odd.to(ty), mask=mask)

    @triton.jit
    def _merge_splits(mid_o_ptr, mid_lse_ptr, parts, D: tl.constexpr, NSPLIT: tl.constexpr):
        """parts (BLOCK_H,): each query head's first split slot -> its output (BLOCK_H, D), the splits' partial
        outputs weighted by their log-sum-exp (base 2); an empty cache attends to nothing: 0."""
        offs_s = tl.arange(0, NSPLIT)
        lse = tl.load(mid_lse_ptr + parts[:, None] + offs_s[None, :], cache_modifier=".cg")  # other SMs wrote these
        top = tl.max(lse, axis=1)
        w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top)[:, None]))
        o = tl.load(mid_o_ptr + (parts[:, None, None] + offs_s[None, :, None]) * D + tl.arange(0, D)[None, None, :],
                    cache_modifier=".cg")
        total = tl.sum(w, axis=1)
        return tl.sum(o * w[:, :, None], axis=1) / tl.where(total > 0, total, 1.0)[:, None]

    @triton.jit
    def _softmax_step(s, v_even, v_odd, p_scale, m_i, l_i, acc_even, acc_odd):
        """A block's scores s (N, BLOCK_H), log2 units, -inf where masked, and its values' even and odd halves,
        transposed, per group of its entries (_value_halves), whose dots take the probabilities times p_scale, folded
        into the running max, sum and transposed output halves (D // 2, BLOCK_H); a block with every entry masked
        changes nothing."""
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[None, :])
        alpha = tl.exp2(m_i - m_ref)
        acc_even *= alpha[None, :]
        acc_odd *= alpha[None, :]
        p16 = _probability_groups((p * p_scale).to(tl.float16), len(v_even))
        for g in tl.static_range(len(v_even)):
            acc_even = tl.dot(v_even[g], p16[g], acc_even)
            acc_odd = tl.dot(v_odd[g], p16[g], acc_odd)
        return m_new, l_i * alpha + tl.sum(p, axis=0), acc_even, acc_odd

    @triton.jit
    def _walk_slot(i, walk, CAP, RECENT: tl.constexpr):
        """The slot of the entry i steps into a row's walk (_attend_kernel): i itself, or with RECENT i steps after
        the walk's first slot, wrapping."""
        slot = i
        if RECENT > 0:
            slot = walk[0] + i
            slot = tl.where(slot >= CAP, slot - CAP, slot)
        return slot

    @triton.jit
    def _attend_block(q, n0, end, row, walk, m_i, l_i, acc_even, acc_odd, kq_ptr, ks_ptr, kbits_ptr, krnorm_ptr,
                      vq_ptr, vs_ptr, sign_table_ptr, tables, CAP, score_scale, KEY: tl.constexpr,
                      VALUE: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr,
                      RECENT: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
        """The entries n0 .. n0 + BLOCK_N of a walk over cache row `row` (its first slot) folded into the online
        softmax. A block of coded entries before `end` runs unmasked (MASKED false: no compares, selects or predicated
        loads; masked, the loop would take 927 instructions per thread a block for int8 against 832, 587 for tq4
        against 554, at their bandwidth launches: benchmarks/attend_sass.py); a split's last block masks the entries
        from `end`, and a walk's first block the entries that are not coded ones (_attend_kernel)."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = tl.full((BLOCK_N,), 1, tl.int1)
        if MASKED:
            age = tl.where(offs_n >= walk[1], offs_n - walk[1], offs_n - walk[1] + CAP)  # steps after the oldest
            nmask = (offs_n < end) & (age < walk[2])
        entry = row + _walk_slot(offs_n, walk, CAP, RECENT)
        s = _key_scores(q, kq_ptr, ks_ptr, kbits_ptr, krnorm_ptr, sign_table_ptr, entry, nmask, tables[0], KEY, D,
                        GROUP, M) * score_scale
        if MASKED:
            s = tl.where(nmask[:, None], s, float("-inf"))
        tile_word = 0  # read by tq4 values only: each word column's tile's first word
        if VALUE == "tq4":  # (a block's tiles past the capacity wrap, walk or not: their loads take no mask)
            tile_slot = walk[0] + n0 + tl.arange(0, BLOCK_N // 8) // 8 * TQ4_TILE
            tile_word = (row + tl.where(tile_slot >= CAP, tile_slot - CAP, tile_slot)) * (D // 8)
        v_even, v_odd, p_scale = _value_halves(vq_ptr, vs_ptr, entry, tile_word, nmask, tables[1], VALUE, D, GROUP)
        return _softmax_step(s, v_even, v_odd, p_scale, m_i, l_i, acc_even, acc_odd)

    @triton.jit
    def _attend_kernel(q_ptr, kq_ptr, ks_ptr, kbits_ptr, krnorm_ptr, krecent_ptr, vrecent_ptr, newest_ptr, vq_ptr,
                       vs_ptr, sketch_ptr, sign_table_ptr, tq4_tables_ptr, len_ptr, mid_o_ptr, mid_lse_ptr, count_ptr,
                       out_ptr,
                       H, CAP, CHUNK, sm_scale, G: tl.constexpr, KEY: tl.constexpr, VALUE: tl.constexpr,
                       D: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr, RECENT: tl.constexpr,
                       RECENT_VALUES: tl.constexpr, BLOCK_RECENT: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr):
        """Program (row, KV head, split): online softmax over its slice of the filled length for all G query
        heads of that KV head. With one split it writes the output; otherwise it writes its partial output
        and log-sum-exp, and the last split of each (row, KV head) to finish, counted by an atomic, merges
        them (flash decoding in one launch). tq4 and qjl keys: q arrives in the rotated basis (qjl sketches it
        here, once per program); tq4 values: the output leaves in that basis (attend_in_basis).
        RECENT: the splits share the row's entries but its RECENT newest, walking them oldest first (a row's positions
        run on by one, so they are the filled slots from the one after the newest, wrapping): `walk` is its first
        slot, the oldest entry's step into it and the entries to take. Ordering the entries by age costs no mask: the
        loop just ends sooner. tq4 values are read in whole tiles, so their walk begins at the tile that holds the
        oldest entry: the tile's entries before the oldest are the row's newest, and the walk's first block masks
        those of them in the ring by their age (the walk still ends by the capacity, a multiple of the tile). Split 0
        then takes the RECENT newest in one more block, keys exact from the ring of rotated keys, values from the ring
        of rotated values with RECENT_VALUES (else as coded)."""
        b, h, sp = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2)
        tl.static_assert((VALUE != "tq4") | (RECENT == 0) | RECENT_VALUES, "tq4 values keep their newest in a ring")
        ALIGN: tl.constexpr = TQ4_TILE if VALUE == "tq4" else 1  # where a walk may begin: whole tiles of values
        length = tl.load(len_ptr + b)
        walk, newest = (0, 0, length), 0
        if RECENT > 0:
            newest = tl.load(newest_ptr + b)
            oldest = ((newest + 1 - length) % CAP + CAP) % CAP  # the oldest filled entry's slot
            walk = (oldest // ALIGN * ALIGN, oldest % ALIGN, tl.maximum(length - RECENT, 0))
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, tl.minimum(walk[1] + walk[2], CAP))
        offs_h, offs_d = tl.arange(0, BLOCK_H), tl.arange(0, D)
        hmask = offs_h < G
        heads = b * H * G + h * G + offs_h
        q_in = tl.load(q_ptr + heads[:, None] * D + offs_d[None, :], mask=hmask[:, None], other=0).to(tl.float32)
        # Scores in log2 units: exp2 is the hardware's (exp would add a multiply and a denormal fix-up per score). An
        # fp16 query takes the scale once (a multiply per program, not per score); exact keys meet q in their own
        # dtype, rounded as it is, and their scores take it.
        log2_scale = sm_scale * 1.4426950408889634
        score_scale = log2_scale
        if KEY == "exact":
            q = tl.trans(q_in.to(kq_ptr.dtype.element_ty))
        else:
            q_in *= log2_scale
            score_scale = 1.0
            q_even, q_odd = _even_odd_halves(q_in.to(tl.float16))
            q = (tl.trans(q_even), tl.trans(q_odd))
        if KEY == "qjl":
            sq_low, sq_high = _nibble_halves(_sketch(q_in, sketch_ptr, M).to(tl.float16))
            q = (q[0], q[1], tl.trans(sq_low), tl.trans(sq_high))
        key_tables, value_tables = 0, 0  # read by tq4 codes only
        if (KEY == "tq4") | (KEY == "qjl"):
            key_tables = _tq4_tables(tq4_tables_ptr, D // 8, D)
        if VALUE == "tq4":
            value_tables = _tq4_tables(tq4_tables_ptr, BLOCK_N // 8, D)
        tables = (key_tables, value_tables)
        m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_H,), tl.float32)
        acc_even = tl.zeros((D // 2, BLOCK_H), tl.float32)
        acc_odd = tl.zeros((D // 2, BLOCK_H), tl.float32)
        row = (b * H + h) * CAP
        blocks_from = start
        if ALIGN > 1:
            if (sp == 0) & (walk[1] > 0):  # the walk's first block: its entries before the oldest are the newest
                m_i, l_i, acc_even, acc_odd = _attend_block(
                    q, start, end, row, walk, m_i, l_i, acc_even, acc_odd, kq_ptr, ks_ptr, kbits_ptr, krnorm_ptr,
                    vq_ptr, vs_ptr, sign_table_ptr, tables, CAP, score_scale, KEY, VALUE, D, GROUP, M, RECENT, BLOCK_N,
                    True)
                blocks_from = start + BLOCK_N
        full_end = blocks_from + tl.maximum(end - blocks_from, 0) // BLOCK_N * BLOCK_N
        for n0 in range(blocks_from, full_end, BLOCK_N):
            m_i, l_i, acc_even, acc_odd = _attend_block(
                q, n0, end, row, walk, m_i, l_i, acc_even, acc_odd, kq_ptr, ks_ptr, kbits_ptr, krnorm_ptr, vq_ptr,
                vs_ptr, sign_table_ptr, tables, CAP, score_scale, KEY, VALUE, D, GROUP, M, RECENT, BLOCK_N, False)
        if full_end < end:
            m_i, l_i, acc_even, acc_odd = _attend_block(
                q, full_end, end, row, walk, m_i, l_i, acc_even, acc_odd, kq_ptr, ks_ptr, kbits_ptr, krnorm_ptr,
                vq_ptr, vs_ptr, sign_table_ptr, tables, CAP, score_scale, KEY, VALUE, D, GROUP, M, RECENT, BLOCK_N, True)
        if RECENT > 0:
            if sp == 0:
                j = tl.arange(0, BLOCK_RECENT)  # ring slot j holds position p: live if p is a filled entry
                p = newest - ((newest - j) % RECENT + RECENT) % RECENT
                live = (j < RECENT) & (newest - p < length)
                ring = ((b * H + h) * RECENT + j)[:, None] * D + offs_d[None, :]
                k = tl.load(krecent_ptr + ring, mask=live[:, None], other=0).to(tl.float16)
                s = tl.where(live[:, None], tl.dot(k, tl.trans(q_in.to(tl.float16))) * score_scale, float("-inf"))
                if RECENT_VALUES:  # the ring's rows, exact in the rotated basis
                    v_even, v_odd, p_scale = _value_halves(vrecent_ptr, vs_ptr, (b * H + h) * RECENT + j, 0, live, 0,
                                                           "exact", D, GROUP)
                else:
                    v_even, v_odd, p_scale = _value_halves(vq_ptr, vs_ptr, row + tl.maximum(p, 0) % CAP, 0, live,
                                                           tables[1], VALUE, D, GROUP)
                m_i, l_i, acc_even, acc_odd = _softmax_step(s, v_even, v_odd, p_scale, m_i, l_i, acc_even, acc_odd)
        filled = l_i > 0
        l_safe = tl.where(filled, l_i, 1.0)
        denom = l_safe[:, None]
        acc_even, acc_odd = tl.trans(acc_even), tl.trans(acc_odd)
        if NSPLIT == 1:
            _store_even_odd(out_ptr + heads[:, None] * D, acc_even / denom, acc_odd / denom, hmask[:, None])
        else:
            lse = tl.where(filled, m_i + tl.log2(l_safe), float("-inf"))
            parts = heads * NSPLIT
            _store_even_odd(mid_o_ptr + (parts + sp)[:, None] * D, acc_even / denom, acc_odd / denom, hmask[:, None])
            tl.store(mid_lse_ptr + parts + sp, lse, mask=hmask)
            counter = count_ptr + b * H + h
            if tl.atomic_add(counter, 1, sem="acq_rel") == NSPLIT - 1:  # every other split has stored its part
                merged = _merge_splits(mid_o_ptr, mid_lse_ptr, tl.where(hmask, parts, 0), D, NSPLIT)
                tl.store(out_ptr + heads[:, None] * D + offs_d[None, :], merged.to(out_ptr.dtype.element_ty),
                         mask=hmask[:, None])
                tl.atomic_xchg(counter, 0)  # ready for the next step (and the next graph replay)


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device; 8 stands in for the CPU (the interpreter in tests)."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def split_plan(batch: int, heads: int, capacity: int, block_n: int, programs_per_sm: int, device) -> tuple[int, int]:
    """(splits, chunk): about `programs_per_sm` programs per SM; static for a given cache, so CUDA graphs can replay it."""
    splits = triton.next_power_of_2(max(1, -(-programs_per_sm * sm_count(device) // (batch * heads))))
    splits = max(1, min(splits, 64, triton.next_power_of_2(-(-capacity // block_n))))
    chunk = -(-capacity // splits)
    return splits, -(-chunk // block_n) * block_n


def programs_an_sm(registers: int, shared: int, warps: int) -> int:
    """The programs of a kernel build one Hopper SM (sm_90: H100, H200) runs at once: 65,536 registers (a warp takes
    its threads' registers rounded up to 8 each), 228 KiB of shared memory (1 KiB more a program), 32 programs, 64
    warps."""
    by_registers = 65536 // (-(-registers // 8) * 8 * 32 * warps)
    return min(by_registers, 233472 // (shared + 1024), 32, 64 // warps)


# Attention launch settings: (block_n, num_warps, num_stages, programs per SM, register cap or None).
Launch = tuple[int, int, int, int, int | None]
# KV write launch settings: (KV heads a program, num_warps).
WriteLaunch = tuple[int, int]


class RotatedQuery(NamedTuple):
    """A query as the tq4 and qjl Triton prologues hand it to attend: q in the layer's rotated basis (B, Hq, D)."""
    values: Tensor


class KernelCodes(NamedTuple):
    """A backend's cache buffers in the kernels' order; a codec without one of them passes any tensor."""
    key: Tensor  # codes (exact: the keys)
    key_scale: Tensor  # int8: per group; tq4 and qjl: per vector
    key_bits: Tensor  # qjl: sign bits of the sketched residual
    key_rnorm: Tensor  # qjl: the residual's norm, fp16
    recent_keys: Tensor  # RecentExactMixin: the ring of the newest keys, rotated (B, Hkv, R, D)
    recent_values: Tensor  # RecentExactMixin with ring_values: the ring of the newest values, rotated
    newest: Tensor  # RecentExactMixin: each row's newest position (B,) int32
    value: Tensor
    value_scale: Tensor

    @classmethod
    def of(cls, key: Tensor, key_scale: Tensor, value: Tensor, value_scale: Tensor, **more: Tensor) -> "KernelCodes":
        """The buffers a codec has; an absent one is passed as the key codes (its kernel branch never reads it)."""
        return cls(**{**dict.fromkeys(cls._fields, key), "key_scale": key_scale, "value": value,
                      "value_scale": value_scale, **more})


class KernelTables(NamedTuple):
    """The kernels' read-only operands beyond the cache buffers; a backend that does not use one passes any tensor."""
    sketch: Tensor  # qjl: S (M, D) fp16
    sign_table: Tensor  # qjl: the 128-byte fp16 sign table
    rot_signs: Tensor  # tq4 and qjl: the rotation's signs (D,) fp32
    hadamard: Tensor  # tq4 and qjl: H (D, D) fp16, +-1
    codebook: Tensor  # tq4 and qjl: the 16 centroids of N(0, 1) by code, then the 7 bounds between magnitudes, fp32
    decoder_tables: Tensor  # tq4 and qjl: tq4_byte_tables, a copy per word column (D // 8, 4) int32


class TritonAttendMixin:
    """append / prologue / attend through the Triton kernels over the torch reference backend's own buffers.

    A Triton backend is one class: this mixin, its torch reference (the next base; the tests check the kernels
    against it), and its declaration: `key_codec` and `value_codec` (the kernels' named constexpr codecs),
    `launch` (attention launch settings per regime, from benchmarks/benchmark_kv_backends.py --sweep), and
    `codes()` (its buffers in the kernels' order). The registry, the tests and the benchmarks' grids derive
    from these classes."""

    key_codec: str
    value_codec: str
    # Fewer (row, KV head) pairs than SMs is latency-bound: short blocks, many splits. More is bandwidth-bound:
    # long blocks, and a register cap where more programs per SM hide more latency than the spills cost.
    launch: dict[str, Launch]
    # Overrides, set on an instance before its first call (both are planned once, in _plan; relaunch plans again):
    # the attention launch settings and the write kernel's.
    settings: Launch | None = None
    write_settings: WriteLaunch | None = None
    bandwidth_write_warps = 2  # QJL prologue, batch 512: 8.3 against 11.9 us in 4
    build = None  # the attention kernel as the last attend compiled it for the GPU (the interpreter compiles none)

    def codes(self) -> KernelCodes:
        raise NotImplementedError

    def kernel_codes(self) -> KernelCodes:
        """codes(), with the rings of the newest entries where the backend keeps them (RecentExactMixin)."""
        codes = self.codes()
        if self.recent == 0:
            return codes
        return codes._replace(recent_keys=self.k_recent, newest=self.newest,
                              **({"recent_values": self.v_recent} if self.recent_values else {}))

    def tables(self) -> KernelTables:
        any_tensor = self.lengths
        return KernelTables(*(any_tensor,) * len(KernelTables._fields))

    def bandwidth_bound(self) -> bool:
        """At least as many (row, KV head) pairs as SMs: the bandwidth regime; fewer: latency."""
        return self.batch * self.heads >= sm_count(self.device)

    def launch_settings(self) -> Launch:
        return self.settings or self.launch["bandwidth" if self.bandwidth_bound() else "latency"]

    def write_launch(self) -> WriteLaunch:
        """Bandwidth regime: all of a row's KV heads in a program, so a sketch or rotation loads once per row, in
        bandwidth_write_warps. Latency regime: a KV head a program, in 4 warps."""
        return self.write_settings or ((self.heads, self.bandwidth_write_warps) if self.bandwidth_bound() else (1, 4))

    def relaunch(self, settings: Launch | None = None, write_settings: WriteLaunch | None = None) -> None:
        """New launch overrides (None: the declared launch), planned at the next call: a sweep's step."""
        self.settings, self.write_settings = settings, write_settings
        self.__dict__.pop("splits", None)

    def _plan(self):
        if not hasattr(self, "splits"):
            self.block_n, self.num_warps, self.num_stages, programs_per_sm, self.max_registers = self.launch_settings()
            self.heads_per_write, self.write_warps = self.write_launch()
            if self.heads % self.heads_per_write:
                raise ValueError(f"write settings {self.write_launch()}: {self.heads_per_write} KV heads a program do "
                                 f"not divide the cache's {self.heads}")
            self.splits, self.chunk = split_plan(self.batch, self.heads, self.capacity, self.block_n, programs_per_sm,
                                                 self.device)
            parts = self.batch * self.q_heads * self.splits
            self.mid_o = torch.empty(parts, self.head_dim, device=self.device)
            self.mid_lse = torch.empty(parts, device=self.device)
            self.split_count = torch.zeros(self.batch * self.heads, dtype=torch.int32, device=self.device)

    def empty_query(self, dtype: torch.dtype) -> Tensor | RotatedQuery:
        """What the fused prologue writes the query into, in the form attend takes."""
        return torch.empty(self.batch, self.q_heads, self.head_dim, device=self.device, dtype=dtype)

    def _write(self, x: Tensor, v: Tensor, positions: Tensor, q=None, inv_freq: Tensor | None = None,
               q_gain: Tensor | None = None) -> None:
        self._plan()
        group = self.heads_per_write
        query_rows, block_k = group * self.q_heads // self.heads if q is not None else 0, triton.next_power_of_2(group)
        rows = -(-query_rows // block_k) * block_k + 2 * block_k  # keys and values at multiples of block_k (_rows)
        t = self.tables()
        _kv_write_kernel[(self.batch, self.heads // group)](
            x, v, query_tensor(x if q is None else q), positions, positions.stride(0), self.lengths,
            x if inv_freq is None else inv_freq, x if q_gain is None else q_gain, *self.kernel_codes(), t.sketch,
            t.rot_signs, t.hadamard, t.codebook,
            x.stride(0), self.capacity, torch.finfo(torch.float32).eps, PROLOGUE=q is not None, HQ=self.q_heads,
            H=self.heads, HG=group, ROWS=triton.next_power_of_2(rows), BLOCK_K=block_k,
            KEY=self.key_codec, VALUE=self.value_codec, D=self.head_dim, GROUP=self.cfg.group_size, M=self.cfg.qjl_dim,
            RECENT=self.recent, RECENT_VALUES=self.recent_values, num_warps=self.write_warps)

    def append(self, k, v, positions):
        b = self.batch
        self._write(k.reshape(b, -1).contiguous(), v.reshape(b, -1).contiguous(), positions)

    def prologue(self, qkv, positions, inv_freq, q_gain):
        qkv = qkv.contiguous()
        q = self.empty_query(qkv.dtype)
        self._write(qkv, qkv[:, (self.q_heads + self.heads) * self.head_dim:], positions, q, inv_freq, q_gain)
        return q

    def attend(self, q):
        self._plan()
        g = self.q_heads // self.heads
        out = torch.empty(self.batch, self.q_heads, self.head_dim, device=self.device, dtype=self.dtype)
        t = self.tables()
        self.build = _attend_kernel[(self.batch, self.heads, self.splits)](
            query_tensor(q), *self.kernel_codes(), t.sketch, t.sign_table, t.decoder_tables, self.lengths,
            self.mid_o, self.mid_lse, self.split_count, out, self.heads, self.capacity, self.chunk, self.sm_scale, G=g,
            KEY=self.key_codec, VALUE=self.value_codec, D=self.head_dim, GROUP=self.cfg.group_size,
            M=self.cfg.qjl_dim, RECENT=self.recent, RECENT_VALUES=self.recent_values,
            BLOCK_RECENT=max(16, triton.next_power_of_2(self.recent)), BLOCK_H=max(8, triton.next_power_of_2(g)),
            BLOCK_N=self.block_n, NSPLIT=self.splits, num_warps=self.num_warps, num_stages=self.num_stages,
            maxnreg=self.max_registers)
        return out

    def build_report(self) -> dict[str, int] | None:
        """The last attend's kernel as compiled for the GPU: a thread's registers and spills, a program's shared
        memory, and the programs an SM runs at once; None before a GPU build."""
        if self.build is None:
            return None
        registers, shared = self.build.n_regs, self.build.metadata.shared
        return {"registers": registers, "spills": self.build.n_spills, "shared_bytes": shared,
                "programs_an_sm": programs_an_sm(registers, shared, self.num_warps)}


def query_tensor(q: Tensor | RotatedQuery) -> Tensor:
    return (q.values if isinstance(q, RotatedQuery) else q).contiguous()


class RotatedAttendMixin(TritonAttendMixin):
    """A backend whose keys are scored in the layer's rotated basis (its `mse` coder's): the fused prologue rotates q
    with k (one dot over the tile), a plain q is rotated here, and tq4 values, which decode in that basis, leave
    attend_in_basis in it (the decoder folds the rotation into the output projection) and attend rotated back."""

    def as_query(self, q):
        return RotatedQuery((q.float() @ self.mse.rotation).to(q.dtype))

    def empty_query(self, dtype):
        return RotatedQuery(super().empty_query(dtype))

    def tables(self):
        return super().tables()._replace(rot_signs=self.mse.signs, hadamard=self.mse.hadamard,
                                         codebook=self.mse.codebook, decoder_tables=self.mse.decoder_tables)

    @property
    def output_basis(self) -> Tensor | None:
        return self.mse.rotation if self.value_codec == "tq4" else None

    def attend_in_basis(self, q):
        return super().attend(q if isinstance(q, RotatedQuery) else self.as_query(q))

    def attend(self, q):
        out, basis = self.attend_in_basis(q), self.output_basis
        return out if basis is None else (out.float() @ basis.T).to(self.dtype)


class ExactTritonCache(TritonAttendMixin, ExactCache):
    """The exact cache through the Triton kernels: the exact reference of a long eval at the quantized backends'
    speed (the torch reference attends over the whole buffer)."""

    name, key_codec, value_codec = "bf16_triton", "exact", "exact"
    launch = {"latency": (64, 4, 1, 8, None), "bandwidth": (64, 2, 1, 8, None)}

    def codes(self):
        return KernelCodes.of(self.k, self.k, self.v, self.v)


class Int8TritonCache(TritonAttendMixin, Int8Cache):
    name, key_codec, value_codec = "int8_triton", "int8", "int8"
    # Bandwidth regime swept on one H200 at ctx 1024 x batch 1024, the scored eval's shape (48 settings, one-warp
    # programs in the grid): 148.7 us, against 173.0 for the former fastest (64, 2, 3, 4, None)
    launch = {"latency": (64, 4, 3, 4, None), "bandwidth": (64, 1, 3, 8, None)}

    def codes(self):
        return KernelCodes.of(self.k_q, self.k_s, self.v_q, self.v_s)


class QJLTritonCache(RotatedAttendMixin, QJLCache):
    name, key_codec = "qjl_triton", "qjl"
    # Bandwidth regime swept on one H200 at ctx 1024 x batch 1024 (108 settings): the fastest, 270.9 us (the fastest
    # without a register cap, (128, 2, 3, 4, None), 277.2)
    launch = {"latency": (64, 4, 3, 4, None), "bandwidth": (64, 2, 3, 8, 128)}

    @property
    def value_codec(self) -> str:
        return f"int{self.cfg.value_bits}"

    def codes(self):
        return KernelCodes.of(self.k_codes, self.k_scale, self.v_q, self.v_s, key_bits=self.k_bits,
                              key_rnorm=self.k_rnorm)

    def tables(self):
        return super().tables()._replace(sketch=self.sketch, sign_table=self.signs)


class QJLRecentKTritonCache(QJLTritonCache, QJLRecentKCache):
    name = "qjl_recentk_triton"


class TQ4TritonCache(RotatedAttendMixin, TQ4Cache):
    name, key_codec, value_codec = "tq4_triton", "tq4", "tq4"
    capacity_multiple = TQ4_VALUE_TILE
    # Blocks of 64, whole tiles of values. Bandwidth: one warp, 4 stages, a 168 cap (12 programs an SM; triton 3.9
    # takes 235 registers uncapped) issue 463 instructions a cached entry in the sm_90 build (benchmarks/attend_sass.py,
    # triton 3.6), against 561 for the rows of values before the tiles; swept on one H200 (24 settings at 16384x64,
    # 2026-12-05) it was the fastest, 118.3 us, against the rows' 143.6. Latency (not swept): four warps would decode
    # each value tile twice (970 an entry, against the rows' 824); two, 538. Its write, swept at 1024x1024 before the
    # tiles: 7.7 us in one warp against 9.4 in two (at 16384x64 6.6 against 6.5).
    launch = {"latency": (64, 2, 4, 4, None), "bandwidth": (64, 1, 4, 16, 168)}
    bandwidth_write_warps = 1

    def codes(self):
        return KernelCodes.of(self.k_codes, self.k_scale, self.v_codes, self.v_scale)


TORCH_BACKENDS = (ExactCache, Int8Cache, QJLCache, QJLRecentKCache, TQ4Cache)
TRITON_BACKENDS = (ExactTritonCache, Int8TritonCache, QJLTritonCache, QJLRecentKTritonCache, TQ4TritonCache)
KV_BACKENDS: dict[str, type[KVCache]] = {cls.name: cls for cls in TORCH_BACKENDS + TRITON_BACKENDS}
TORCH_REFERENCE = {cls.name: next(base.name for base in cls.__mro__[1:] if base in TORCH_BACKENDS)
                   for cls in TRITON_BACKENDS}


def exact_backend(device) -> str:
    """The exact reference an eval scores first: on CUDA the Triton kernels, whose attention reads only the filled
    length (the torch reference attends over the whole buffer: too slow for a whole validation split)."""
    return ExactTritonCache.name if use_decode_kernels(torch.device(device)) else ExactCache.name


def default_backend(device) -> str:
    """The scored backend where none is named: the Triton int8 cache on CUDA, its torch reference elsewhere."""
    return Int8TritonCache.name if use_decode_kernels(torch.device(device)) else Int8Cache.name


def backend_problem(name: str, device) -> str | None:
    """Why backend `name` cannot run on `device` (a sentence naming the alternative), or None if it can."""
    if name not in TORCH_REFERENCE:
        return None
    ref = TORCH_REFERENCE[name]
    if triton is None:
        return f"needs triton, which is not installed; install it, or use {ref} (its torch reference)"
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (f"its Triton kernels need a CUDA GPU and this machine has none; use {ref} (its torch reference), "
                f"or set TRITON_INTERPRET=1 to run the kernels in the Triton interpreter (slow)")
    return interpreter_problem()


def release(version: str) -> tuple[int, ...]:
    """A package's version as its (major, minor) numbers, to compare: "3.10.1" -> (3, 10), "2.5.0rc1" -> (2, 5)."""
    return tuple(int(part) for part in version.split(".")[:2])


def interpreter_problem() -> str | None:
    """Why the Triton interpreter (TRITON_INTERPRET=1) cannot run the kernels here, or None (it can, or it is off):
    before Triton 3.7 it takes a loop's runtime bounds by int() of a one-element array, which NumPy refuses from
    2.4 on (Triton 3.6 fails 75 of tests/test_kv.py's tests with NumPy 2.4.6, and passes them all with 2.3.5)."""
    if triton is None or os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import numpy  # the interpreter's arrays

    if release(triton.__version__) < (3, 7) and release(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter cannot run with NumPy {numpy.__version__} (it takes "
                f"loop bounds by int() of a one-element array, which NumPy 2.4 refuses); upgrade triton to 3.7 or "
                f"later, or install numpy<2.4")
    return None


def make_kv_cache(name: str, batch: int, num_kv_heads: int, num_q_heads: int, capacity: int, head_dim: int, device,
                  dtype: torch.dtype, cfg: KVConfig = KVConfig(), layer: int = 0) -> KVCache:
    if name not in KV_BACKENDS:
        raise ValueError(f"KV backend {name!r} is unknown; valid backends: {', '.join(KV_BACKENDS)}")
    problem = backend_problem(name, device)
    if problem:
        raise RuntimeError(f"KV backend {name}: {problem}")
    return KV_BACKENDS[name](batch, num_kv_heads, num_q_heads, capacity, head_dim, device, dtype, cfg, layer)


# -----------------------------------------------------------------------------
# Decode-step kernels. With one token per row a decode step is bound by kernel launches, not bytes:
# these fuse the residual stream between sub-layers, the small-batch linears and the scoring of the
# next token. CUDA runs the kernels; the CPU (and the tests, against the kernels under
# TRITON_INTERPRET=1) the torch references, which the model's training forward shares.
# -----------------------------------------------------------------------------


def softcap_logits(proj: Tensor, softcap: float) -> Tensor:
    return softcap * torch.tanh(proj.float() / softcap)


def relu_square_reference(x: Tensor) -> Tensor:
    return torch.relu(x).square()


def residual_norm_reference(x: Tensor, delta: Tensor | None = None, delta_scale: Tensor | None = None,
                            skip: Tensor | None = None, skip_weight: Tensor | None = None, skip_self: bool = False,
                            x0: Tensor | None = None, mix: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """s = x + delta_scale * delta; y = s + skip_weight * skip (skip is s itself with skip_self);
    y = mix[0] * y + mix[1] * x0; h = rms_norm(y). Absent terms drop out. Returns (s, y, h)."""
    s = x if delta is None else x + delta_scale.to(x.dtype) * delta
    y = s if skip_weight is None else s + skip_weight.to(x.dtype) * (s if skip_self else skip)
    if mix is not None:
        m = mix.to(x.dtype)
        y = m[0] * y + m[1] * x0
    return s, y, F.rms_norm(y, (y.size(-1),))


def next_token_nll_reference(proj: Tensor, targets: Tensor, softcap: float) -> Tensor:
    return F.cross_entropy(softcap_logits(proj, softcap), targets, reduction="none")


if triton is not None:

    @triton.jit
    def _load_f32(ptr, idx, mask):
        return tl.load(ptr + idx, mask=mask, other=0).to(tl.float32)

    @triton.jit
    def _residual_norm_kernel(x_ptr, d_ptr, ds_ptr, skip_ptr, sw_ptr, x0_ptr, mix_ptr, s_ptr, y_ptr, h_ptr, n, eps,
                              HAS_DELTA: tl.constexpr, SKIP: tl.constexpr, HAS_MIX: tl.constexpr,
                              BLOCK: tl.constexpr):
        """Program per row, fp32 in registers; SKIP: 0 none, 1 the skip tensor, 2 s itself."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        at = row * n + offs
        s = _load_f32(x_ptr, at, mask)
        if HAS_DELTA:
            s = s + _load_f32(ds_ptr, offs, mask) * _load_f32(d_ptr, at, mask)
        y = s
        if SKIP == 1:
            y = y + _load_f32(sw_ptr, offs, mask) * _load_f32(skip_ptr, at, mask)
        if SKIP == 2:
            y = y + _load_f32(sw_ptr, offs, mask) * s
        if HAS_MIX:
            y = _load_f32(mix_ptr, offs, mask) * y + _load_f32(mix_ptr, n + offs, mask) * _load_f32(x0_ptr, at, mask)
        h = y / tl.sqrt(tl.sum(y * y, axis=0) / n + eps)
        ty = s_ptr.dtype.element_ty
        tl.store(s_ptr + at, s.to(ty), mask=mask)
        tl.store(y_ptr + at, y.to(ty), mask=mask)
        tl.store(h_ptr + at, h.to(ty), mask=mask)

    @triton.jit
    def _small_batch_linear_kernel(x_ptr, w_ptr, out_ptr, N, K, RELU_SQUARE: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr):
        """Program (block of BLOCK_N outputs, row): out = x W^T on CUDA cores, fp32 accumulation; with
        RELU_SQUARE, relu(out)^2. At a few rows, a GEMM library's kernels spend their time in setup."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row = tl.program_id(1).to(tl.int64)
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * K + offs_k, mask=offs_k < K, other=0).to(tl.float32)
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=(offs_n[:, None] < N) & (offs_k[None, :] < K),
                        other=0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        if RELU_SQUARE:
            acc = tl.maximum(acc, 0.0)
            acc = acc * acc
        tl.store(out_ptr + row * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)

    @triton.jit
    def _relu_square_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.maximum(tl.load(x_ptr + offs, mask=offs < n, other=0).to(tl.float32), 0.0)
        tl.store(out_ptr + offs, (x * x).to(out_ptr.dtype.element_ty), mask=offs < n)

    @triton.jit
    def _score_next_token_kernel(proj_ptr, rows_ptr, pos_ptr, row_len, window_ptr, loss_ptr, V, softcap,
                                 BLOCK_V: tl.constexpr):
        """Program per row b at position p = pos[b]: NLL of the softcapped logits at the row's next token
        rows[b, p + 1], added to its fp64 loss if p lies in the row's scored window [from, to); then
        pos[b] = p + 1."""
        b = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + b)
        scored = (pos >= tl.load(window_ptr + 2 * b)) & (pos < tl.load(window_ptr + 2 * b + 1))
        target = tl.load(rows_ptr + b * row_len + tl.minimum(tl.maximum(pos, 0) + 1, row_len - 1))
        offs = tl.arange(0, BLOCK_V)
        z = tl.load(proj_ptr + b * V + offs, mask=offs < V, other=0).to(tl.float32) / softcap
        logit = tl.where(offs < V, softcap * (1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)), float("-inf"))  # softcap*tanh(z)
        top = tl.max(logit, axis=0)
        lse = top + tl.log(tl.sum(tl.exp(logit - top), axis=0))
        nll = lse - tl.sum(tl.where(offs == target, logit, 0.0), axis=0)
        tl.store(loss_ptr + b, tl.load(loss_ptr + b) + tl.where(scored, nll.to(tl.float64), 0.0))
        tl.store(pos_ptr + b, pos + 1)


def residual_norm_triton(x: Tensor, delta: Tensor | None = None, delta_scale: Tensor | None = None,
                         skip: Tensor | None = None, skip_weight: Tensor | None = None, skip_self: bool = False,
                         x0: Tensor | None = None, mix: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    n = x.shape[-1]
    s, y, h = (torch.empty_like(x) for _ in range(3))
    _residual_norm_kernel[(x.numel() // n,)](
        x, x if delta is None else delta, x if delta_scale is None else delta_scale, x if skip is None else skip,
        x if skip_weight is None else skip_weight, x if x0 is None else x0, x if mix is None else mix, s, y, h, n,
        torch.finfo(torch.float32).eps, HAS_DELTA=delta is not None,
        SKIP=2 if skip_self else int(skip is not None), HAS_MIX=mix is not None, BLOCK=triton.next_power_of_2(n))
    return s, y, h


def small_batch_linear_triton(x: Tensor, w: Tensor, relu_square: bool = False) -> Tensor:
    n, k = w.shape
    out = torch.empty(*x.shape[:-1], n, device=x.device, dtype=x.dtype)
    _small_batch_linear_kernel[(triton.cdiv(n, 4), x.numel() // k)](x.contiguous(), w, out, n, k, RELU_SQUARE=relu_square,
                                                                     BLOCK_N=4, BLOCK_K=512, num_warps=4)
    return out


def relu_square_triton(x: Tensor) -> Tensor:
    out = torch.empty_like(x)
    _relu_square_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


def use_decode_kernels(device: torch.device) -> bool:
    return device.type == "cuda" and triton is not None


def residual_norm(x: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    return (residual_norm_triton if use_decode_kernels(x.device) else residual_norm_reference)(x, *args, **kwargs)


def relu_square(x: Tensor) -> Tensor:
    return (relu_square_triton if use_decode_kernels(x.device) else relu_square_reference)(x)


SMALL_BATCH_ROWS = 4  # up to this many rows, decode_linear runs the small-batch kernel


def decode_linear(x: Tensor, w: Tensor, relu_square_out: bool = False) -> Tensor:
    """x W^T (then relu^2) for a decode step: the small-batch kernel at a few rows, else the GEMM library."""
    if use_decode_kernels(x.device) and x.numel() // x.shape[-1] <= SMALL_BATCH_ROWS:
        return small_batch_linear_triton(x, w, relu_square_out)
    y = F.linear(x, w)
    return relu_square(y) if relu_square_out else y


def score_next_token_reference(proj: Tensor, rows: Tensor, positions: Tensor, window: Tensor, loss: Tensor,
                               softcap: float) -> None:
    """loss[b] += NLL of rows[b, positions[b] + 1] under the softcapped logits of proj (B, V) where
    window[b, 0] <= positions[b] < window[b, 1] (the row's scored positions); then every position advances."""
    targets = rows.gather(1, (positions.clamp_min(0)[:, None] + 1).clamp_max(rows.shape[1] - 1)).squeeze(1)
    scored = (positions >= window[:, 0]) & (positions < window[:, 1])
    loss += torch.where(scored, next_token_nll_reference(proj, targets, softcap).double(), 0.0)
    positions += 1


def score_next_token_triton(proj: Tensor, rows: Tensor, positions: Tensor, window: Tensor, loss: Tensor,
                            softcap: float) -> None:
    assert window.shape == (proj.shape[0], 2) and window.is_contiguous() and rows.stride(1) == 1
    _score_next_token_kernel[(proj.shape[0],)](proj, rows, positions, rows.stride(0), window, loss, proj.shape[1],
                                               softcap, BLOCK_V=triton.next_power_of_2(proj.shape[1]))


def score_next_token(proj: Tensor, *args) -> None:
    (score_next_token_triton if use_decode_kernels(proj.device) else score_next_token_reference)(proj, *args)


# -----------------------------------------------------------------------------
# The autoregressive eval: plans of token rows, the decoder (one cache per layer, each step a CUDA graph
# replay), the eval loop with its progress lines, and the final evals the trainer logs. It runs the model as
# a DecodeModel and the caches through their interface only: no branch on a backend's name.
# -----------------------------------------------------------------------------


def cuda_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mem_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def bpb(loss_sum: float, tokens: float, nbytes: float) -> tuple[float, float]:
    """Summed NLL (nats) over `tokens` targets of `nbytes` bytes -> (mean loss, bits per byte)."""
    loss = loss_sum / tokens
    return loss, loss / math.log(2.0) * tokens / nbytes


@dataclass(frozen=True)
class AREvalSettings:
    """What the AR evals take of a run's settings (built by Hyperparameters.ar_eval_settings)."""
    backend: str  # the scored eval's (KV_QUANT_BACKEND, resolved for the device)
    compare_backends: tuple[str, ...]
    batch: int  # rows decoded at once; the scored eval cuts the split into this many spans
    context: int  # the ring cache's entries C
    window: int  # the teacher-forced windows that the windows check reproduces (TRAIN_SEQ_LEN)
    cuda_graph: bool
    cache: KVConfig
    max_tokens: int = 0  # the scored eval's targets (KV_EVAL_MAX_TOKENS; 0: all)
    compare_tokens: int = 0  # the exact reference's and the comparisons' targets, a prefix of those (0: all)

    def token_slices(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(scored, compared): the first targets of the validation tokens, with the token before each."""
        def prefix(t: Tensor, n: int) -> Tensor:
            return t if n <= 0 else t[:n + 1]

        scored = prefix(tokens, self.max_tokens)
        return scored, prefix(scored, self.compare_tokens)

    def __post_init__(self):
        for var, name in self.named_backends():
            if name not in KV_BACKENDS and not (var == "KV_QUANT_BACKEND" and name == "auto"):
                raise ValueError(f"{var}: KV backend {name!r} is unknown; valid backends: auto (KV_QUANT_BACKEND "
                                 f"only), {', '.join(KV_BACKENDS)}")

    def named_backends(self) -> list[tuple[str, str]]:
        return [("KV_QUANT_BACKEND", self.backend)] + [("KV_EVAL_COMPARE_BACKENDS", b) for b in self.compare_backends]

    def for_device(self, device: torch.device) -> "AREvalSettings":
        """These settings with KV_QUANT_BACKEND=auto resolved for the device; a backend that cannot run there (a
        Triton backend on a CPU without the interpreter), or not with the context's cache, is refused."""
        resolved = replace(self, backend=default_backend(device) if self.backend == "auto" else self.backend)
        for var, name in resolved.named_backends():
            problem = backend_problem(name, device)
            if problem:
                raise ValueError(f"{var}={name}: {problem}")
            multiple = KV_BACKENDS[name].capacity_multiple
            if self.context % multiple:
                raise ValueError(f"{var}={name} reads its cache in tiles of {multiple} entries, and the AR eval's "
                                 f"context of {self.context} (KV_EVAL_CONTEXT_LEN, else TRAIN_SEQ_LEN) is not a "
                                 f"multiple of {multiple}; set KV_EVAL_CONTEXT_LEN to one")
        return resolved


class DecodeModel:
    """A trained GPT as the decoder runs it, one token per row at its absolute position through one KV cache per
    layer: a copy with the QAT deltas folded in and every parameter in the compute dtype (the RoPE frequencies, a
    buffer, stay fp32), and each attention's Q, K and V weights fused into one matrix, so a token costs one GEMM
    for them. decode_hidden is GPT.forward_logits with the residual stream between sub-layers fused
    (residual_norm: one kernel per sub-layer on CUDA), and each cache's output basis folded into its layer's
    output projection (output_projections)."""

    @torch.no_grad()
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        m = copy.deepcopy(model).eval()
        for linear in m.modules():  # a CastedLinear's weight plus its QAT delta is the weight training saw
            if getattr(linear, "qat_delta", None) is not None:
                linear.weight += linear.qat_delta
                linear.qat_delta = None
        if m.emb_qat_delta is not None:
            m.tok_emb.weight += m.emb_qat_delta
            m.emb_qat_delta = None
        for p in m.parameters():
            p.data = p.data.to(dtype)
        self.model, self.logit_softcap = m, m.logit_softcap
        self.qkv = [torch.cat((b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight)) for b in m.blocks]
        self.folded: tuple[list, list[Tensor]] | None = None  # (the caches, their output_projections)

    @torch.no_grad()
    def output_projections(self, caches: list) -> list[Tensor]:
        """Each layer's attention output projection W for its cache's attend_in_basis: W itself, or with the cache's
        output basis R folded in per head, W diag(R, ..., R) (out R diag(R^T, ...) W^T = out W^T: no rotation back
        at each step). Folded once per list of caches, the one its decoder passes at every step."""
        if self.folded is not None and self.folded[0] is caches:
            return self.folded[1]
        weights = []
        for block, cache in zip(self.model.blocks, caches, strict=True):
            w, basis = block.attn.proj.weight, cache.output_basis
            if basis is not None:
                w = (w.float().reshape(w.shape[0], -1, basis.shape[0]) @ basis).reshape(w.shape).to(w.dtype)
            weights.append(w)
        self.folded = (caches, weights)
        return weights

    def decode_hidden(self, tokens: Tensor, positions: Tensor, caches: list) -> Tensor:
        """-> the final normed hidden state (B, dim)."""
        m = self.model
        projections = self.output_projections(caches)
        x = F.rms_norm(F.embedding(tokens, m.tok_emb.weight), (m.tok_emb.embedding_dim,))
        x0, skips, delta, delta_scale = x, [], None, None
        for i, (block, qkv, cache, proj) in enumerate(zip(m.blocks, self.qkv, caches, projections, strict=True)):
            j = i - m.num_encoder_layers
            # The first decoder layer's skip is the output of the block just before it, which this
            # residual_norm itself completes (s below): skip_self.
            skip_self = j == 0 and i > 0
            skip = skips.pop() if j > 0 and skips else None
            skip_weight = m.skip_weights[j] if skip_self or skip is not None else None
            s, x, h = residual_norm(x, delta, delta_scale, skip, skip_weight, skip_self, x0, block.resid_mix)
            if 0 < i < m.num_encoder_layers:
                skips.append(s)
            attn = block.attn
            q = cache.prologue(decode_linear(h, qkv), positions, attn.inv_freq, attn.q_gain)
            out = decode_linear(cache.attend_in_basis(q).reshape(h.shape[0], -1), proj)
            _, x, h = residual_norm(x, out, block.attn_scale)
            fc = decode_linear(h, block.mlp.fc.weight, relu_square_out=True)
            delta, delta_scale = decode_linear(fc, block.mlp.proj.weight), block.mlp_scale
        return residual_norm(x, delta, delta_scale)[2]

    def decode_logit_proj(self, h: Tensor) -> Tensor:
        return decode_linear(h, self.model.logit_weight())

    def decode_step(self, tokens: Tensor, positions: Tensor, caches: list) -> Tensor:
        """-> softcapped logits (B, V)."""
        return softcap_logits(self.decode_logit_proj(self.decode_hidden(tokens, positions, caches)), self.logit_softcap)


@dataclass
class DecodePlan:
    """The token rows an AR eval decodes: row b feeds rows[b, p] at position p and scores its next token
    rows[b, p + 1] where window[b, 0] <= p < window[b, 1], through caches of `capacity` entries."""
    rows: Tensor
    window: Tensor
    capacity: int
    mode: str

    @property
    def scored_tokens(self) -> int:
        return int((self.window[:, 1] - self.window[:, 0]).sum())

    @property
    def decoded_tokens(self) -> int:
        return int(self.window[:, 1].sum())

    def scored_bytes(self, luts) -> float:
        rows = self.rows.to(luts.base_bytes.device)
        p = torch.arange(rows.shape[1] - 1, device=rows.device)[None, :]
        window = self.window.to(rows.device)
        scored = (p >= window[:, :1]) & (p < window[:, 1:])
        return float(luts.count(rows[:, :-1], rows[:, 1:])[scored].sum())


def window_plan(tokens: Tensor, seq: int) -> DecodePlan:
    """The teacher-forced windows, one per row: the exact backend must reproduce the teacher-forced score."""
    n = (tokens.numel() - 1) // seq
    if n == 0:
        raise ValueError(f"{tokens.numel() - 1} tokens are fewer than one window ({seq} tokens)")
    return DecodePlan(tokens[:n * seq + 1].unfold(0, seq + 1, seq), torch.tensor([[0, seq]]).repeat(n, 1), seq,
                      "windows")


def ring_plan(tokens: Tensor, batch: int, context: int) -> DecodePlan:
    """Every target scored once, with `context` - 1 tokens before its input (but in the split's first
    window): the targets are cut into `batch` contiguous spans, and each row starts `context` - 1 tokens
    before its span and feeds those without scoring them, through a ring cache of `context` entries."""
    n = tokens.numel() - 1
    rows_n = min(batch, n)
    bounds = [n * i // rows_n for i in range(rows_n + 1)]
    starts = [max(0, s - (context - 1)) for s in bounds[:-1]]
    rows = torch.zeros((rows_n, max(e - a for a, e in zip(starts, bounds[1:], strict=True)) + 1), dtype=tokens.dtype)
    window = torch.empty((rows_n, 2), dtype=torch.int64)
    for i, (a, s, e) in enumerate(zip(starts, bounds[:-1], bounds[1:], strict=True)):
        rows[i, :e - a + 1] = tokens[a:e + 1]
        window[i, 0], window[i, 1] = s - a, e - a
    return DecodePlan(rows, window, context, "ring")


class Decoder:
    """Decodes a (B, L+1) token matrix one column per step through one KV cache per layer, with the
    model's DecodeModel. Every row's position lives on the device (rows past the valid ones sit at
    a negative position: inactive, never written to a cache), so on CUDA the step is captured once in
    a CUDA graph and replayed L times; no host sync until the end."""

    INACTIVE = -(1 << 62)

    def __init__(self, model, backend: str, batch: int, row_len: int, capacity: int, cfg: KVConfig,
                 device: torch.device, dtype: torch.dtype, use_graph: bool):
        attn = model.blocks[0].attn
        self.caches = [make_kv_cache(backend, batch, attn.num_kv_heads, attn.num_heads, capacity, attn.head_dim,
                                     device, dtype, cfg, layer=i)
                       for i in range(len(model.blocks))]
        self.model, self.device, self.batch = DecodeModel(model, dtype), device, batch
        self.rows = torch.zeros((batch, row_len), dtype=torch.int64, device=device)
        self.window = torch.zeros((batch, 2), dtype=torch.int64, device=device)
        self.row_loss = torch.zeros(batch, dtype=torch.float64, device=device)
        self.positions = torch.zeros(batch, dtype=torch.int64, device=device)
        self.graph = None
        if use_graph and device.type == "cuda":
            for c in self.caches:
                c.prewarm()
            self._capture()

    @torch.no_grad()
    def _step(self) -> None:
        t = self.positions[:1]  # row 0 is always live
        h = self.model.decode_hidden(self.rows.index_select(1, t).squeeze(1), self.positions, self.caches)
        score_next_token(self.model.decode_logit_proj(h), self.rows, self.positions, self.window, self.row_loss,
                            self.model.logit_softcap)

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._reset(self.batch)
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def _reset(self, valid: int) -> None:
        for c in self.caches:
            c.reset()
        live = torch.arange(self.batch, device=self.device) < valid
        self.positions.copy_(torch.where(live, 0, self.INACTIVE))
        self.window[valid:] = 0
        self.row_loss.zero_()

    def decode(self, rows: Tensor, window: Tensor, on_step=None) -> float:
        """Decodes the first rows.shape[0] rows; -> the summed NLL (nats) of their scored targets.
        on_step(columns done, this batch's loss so far) is called after every step (a host-side callback)."""
        valid = rows.shape[0]
        self.rows[:valid, :rows.shape[1]].copy_(rows)
        self.window[:valid].copy_(window)
        self._reset(valid)
        for col in range(int(window[:, 1].max())):
            self.graph.replay() if self.graph is not None else self._step()
            if on_step is not None:
                on_step(col + 1, self.row_loss)
        return float(self.row_loss.sum().item())

    def bytes_per_token(self) -> int:
        return sum(c.bytes_per_token() for c in self.caches)


PROGRESS_SECONDS = 30.0


def autoregressive_eval(settings: AREvalSettings, model, plan: DecodePlan, luts, backend: str, device: torch.device,
                        log, batch: int | None = None) -> dict:
    """Decodes the plan's rows `batch` (else settings.batch) at a time through `backend`'s caches; a progress line
    at least every PROGRESS_SECONDS (a host sync then only)."""
    n_rows = plan.rows.shape[0]
    batch = min(batch or settings.batch, n_rows)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    decoder = Decoder(model, backend, batch, plan.rows.shape[1], plan.capacity, settings.cache, device, dtype,
                      settings.cuda_graph and device.type == "cuda")
    tokens, decoded = plan.scored_tokens, plan.decoded_tokens
    state = {"loss": 0.0, "scored": 0, "decoded": 0, "last": time.perf_counter()}
    cuda_sync(device)
    t0 = time.perf_counter()
    for s in range(0, n_rows, batch):
        window = plan.window[s:s + batch]

        def on_step(columns: int, row_loss: Tensor) -> None:
            now = time.perf_counter()
            if now - state["last"] < PROGRESS_SECONDS:
                return
            state["last"] = now
            scored = state["scored"] + int((window[:, 1].clamp(max=columns) - window[:, 0]).clamp_min(0).sum())
            done = state["decoded"] + int(window[:, 1].clamp(max=columns).sum())
            running = (state["loss"] + float(row_loss.sum())) / max(scored, 1)
            log(f"ar_eval_progress backend:{backend} mode:{plan.mode} scored:{scored}/{tokens} "
                f"decoded:{done}/{decoded} running_val_loss:{running:.4f} tok_s:{done / (now - t0):.0f} "
                f"elapsed:{now - t0:.0f}s")

        state["loss"] += decoder.decode(plan.rows[s:s + batch].to(device), window.to(device), on_step)
        state["scored"] += int((window[:, 1] - window[:, 0]).sum())
        state["decoded"] += int(window[:, 1].sum())
    cuda_sync(device)
    seconds = time.perf_counter() - t0
    loss, score = bpb(state["loss"], tokens, plan.scored_bytes(luts))
    return {"backend": backend, "mode": plan.mode, "context": plan.capacity, "val_loss": loss, "val_bpb": score,
            "tokens": tokens, "decoded_tokens": decoded, "batch": batch, "tok_s": decoded / seconds,
            "scored_tok_s": tokens / seconds, "seconds": seconds, "bytes_per_token": decoder.bytes_per_token(),
            "peak_mem_mib": peak_mem_mib(device)}


CHALLENGE_VAL_TOKENS = 62_021_632  # the FineWeb validation split the challenge scores


def final_ar_evals(settings: AREvalSettings, model, scored_tokens: Tensor, compare_tokens: Tensor, references: dict,
                   luts, device: torch.device, log, phases: dict) -> dict:
    """Rank 0. The scored eval: KV_QUANT_BACKEND in ring mode over the scored tokens. Then on the comparison
    slice: the exact backend in ring mode (the reference every delta is taken against), the exact backend in
    windows mode (the check that it reproduces the teacher-forced score), and every comparison backend.
    references: the teacher-forced (loss, bpb) of the comparison slice, "windows" and, if run, "sliding"."""
    context, exact, results = settings.context, exact_backend(device), {}

    def run(label: str, backend: str, plan: DecodePlan) -> dict:
        r = autoregressive_eval(settings, model, plan, luts, backend, device, log)
        if not math.isfinite(r["val_loss"]):
            raise FloatingPointError(f"the AR eval ({label}) through KV backend {backend} scores val_loss {r['val_loss']}")
        results[label] = r
        return r

    def figures(r: dict) -> str:
        return (f"backend:{r['backend']} mode:{r['mode']} context:{r['context']} val_loss:{r['val_loss']:.8f} "
                f"val_bpb:{r['val_bpb']:.8f} tokens:{r['tokens']} decoded:{r['decoded_tokens']} batch:{r['batch']} "
                f"tok_s:{r['tok_s']:.0f} seconds:{r['seconds']:.2f} kv_bytes_per_token:{r['bytes_per_token']}")

    t0 = time.perf_counter()
    scored = run("scored", settings.backend, ring_plan(scored_tokens, settings.batch, context))
    log(f"final_ar_scored {figures(scored)}")
    phases["scored_ar_eval"] = time.perf_counter() - t0
    rows = min(settings.batch, CHALLENGE_VAL_TOKENS)
    decoded = CHALLENGE_VAL_TOKENS + (rows - 1) * (context - 1)
    log(f"eval_budget scored_backend:{scored['backend']} measured_tok_s:{scored['tok_s']:.0f} "
        f"challenge_split_tokens:{CHALLENGE_VAL_TOKENS} batch:{rows} decoded_tokens:{decoded} "
        f"estimated_rank0_seconds:{decoded / scored['tok_s']:.1f}")

    t1 = time.perf_counter()
    ring = ring_plan(compare_tokens, settings.batch, context)
    reference = run("exact_ring", exact, ring)
    line = f"final_ar_exact_reference {figures(reference)}"
    if "sliding" in references:
        line += f" delta_vs_sliding_window:{reference['val_bpb'] - references['sliding'][1]:+.8f}"
    log(line)
    check = run("exact_windows", exact, window_plan(compare_tokens, settings.window))
    log(f"final_ar_windows_check {figures(check)} teacher_forced_val_bpb:{references['windows'][1]:.8f} "
        f"delta_vs_teacher_forced:{check['val_bpb'] - references['windows'][1]:+.8f}")
    for backend in dict.fromkeys([settings.backend, *settings.compare_backends]):
        same = backend == settings.backend and compare_tokens.numel() == scored_tokens.numel()
        r = scored if same else run(f"compare_{backend}", backend, ring)
        r["delta_vs_exact"] = r["val_bpb"] - reference["val_bpb"]
        log(f"final_ar_comparison {figures(r)} delta_vs_exact:{r['delta_vs_exact']:+.8f}")
    phases["reference_ar_evals"] = time.perf_counter() - t1
    return results
