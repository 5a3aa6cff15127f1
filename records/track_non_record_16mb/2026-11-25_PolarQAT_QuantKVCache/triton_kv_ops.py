"""KV-cache backends for the autoregressive eval: one interface, torch references, Triton kernels.

Every backend holds static buffers (B, KV heads, capacity, ...) and on-device lengths, so a decode
step can be captured in a CUDA graph:
    reset()                      forget every entry (lengths <- 0)
    append(k, v, positions)      quantize-on-write the new token of each row at slot position % capacity
    attend(q) -> out             all query heads of each KV head at once (GQA, no repeated K/V)
    bytes_per_token()            logical packed bytes of one token's K and V (all KV heads, one layer)
    tensor_bytes()               bytes the buffers hold
Keys are cached after RoPE at their absolute position, so a ring buffer that evicts old entries
keeps relative positions true. The Triton kernels follow flash decoding: stage 1 splits the
filled length across programs (online softmax, partial output + log-sum-exp), stage 2 merges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


@dataclass(frozen=True)
class KVConfig:
    group_size: int = 32  # channels sharing one fp16 scale
    qjl_dim: int = 256  # sketch bits per key (m)
    value_bits: int = 4  # value codes for the QJL backends (4 or 8)
    recent_exact_tokens: int = 8  # qjl_recentk: newest keys kept exact
    seed: int = 0


# -----------------------------------------------------------------------------
# Shared quantizers (torch): symmetric group quantization, round-half-up, fp16 scales
# -----------------------------------------------------------------------------


def group_quantize(x: Tensor, group: int, bits: int) -> tuple[Tensor, Tensor]:
    """x (..., D) -> codes int8 (..., D) in [-qmax, qmax], scales fp16 (..., D // group)."""
    qmax = 2 ** (bits - 1) - 1
    xg = x.float().reshape(*x.shape[:-1], -1, group)
    scale = (xg.abs().amax(-1) / qmax).clamp_min(1e-8).half()
    q = torch.floor(xg / scale.float()[..., None] + 0.5).clamp(-qmax, qmax)
    return q.reshape(x.shape).to(torch.int8), scale


def group_dequantize(q: Tensor, scale: Tensor, group: int) -> Tensor:
    return (q.float().reshape(*q.shape[:-1], -1, group) * scale.float()[..., None]).reshape(q.shape)


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


def qjl_sketch(head_dim: int, m: int, seed: int, device) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, head_dim, generator=gen).to(device)


# -----------------------------------------------------------------------------
# Torch reference backends
# -----------------------------------------------------------------------------


class KVCache:
    """Base: buffers, lengths and a masked softmax over the whole buffer (O(capacity), the reference)."""

    def __init__(self, batch: int, num_kv_heads: int, num_q_heads: int, capacity: int, head_dim: int,
                 device, dtype: torch.dtype, cfg: KVConfig = KVConfig(), layer: int = 0):
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads do not split over {num_kv_heads} KV heads")
        self.batch, self.heads, self.q_heads, self.capacity, self.head_dim = batch, num_kv_heads, num_q_heads, capacity, head_dim
        self.device, self.dtype, self.cfg, self.layer = torch.device(device), dtype, cfg, layer
        self.sm_scale = head_dim ** -0.5
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.rows = torch.arange(batch, device=device)
        self.buffers: dict[str, Tensor] = {}
        self.allocate()

    def buffer(self, name: str, *trailing: int, dtype: torch.dtype) -> Tensor:
        t = torch.zeros(self.batch, self.heads, self.capacity, *trailing, dtype=dtype, device=self.device)
        self.buffers[name] = t
        setattr(self, name, t)
        return t

    def reset(self) -> None:
        self.lengths.zero_()

    def append(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        slots = positions % self.capacity
        self.write(k, v, slots)
        self.lengths.copy_(torch.clamp(positions + 1, max=self.capacity))

    def store(self, name: str, slots: Tensor, value: Tensor) -> None:
        self.buffers[name][self.rows, :, slots] = value

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
        z = torch.randn(self.batch, self.heads, self.head_dim, device=self.device, dtype=self.dtype)
        self.append(z, z, torch.zeros(self.batch, dtype=torch.int64, device=self.device))
        self.attend(torch.randn(self.batch, self.q_heads, self.head_dim, device=self.device, dtype=self.dtype))
        self.reset()

    def allocate(self) -> None:
        raise NotImplementedError

    def write(self, k: Tensor, v: Tensor, slots: Tensor) -> None:
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

    def allocate(self):
        self.buffer("k", self.head_dim, dtype=self.dtype)
        self.buffer("v", self.head_dim, dtype=self.dtype)

    def write(self, k, v, slots):
        self.store("k", slots, k.to(self.dtype))
        self.store("v", slots, v.to(self.dtype))

    def scores(self, q):
        return torch.einsum("bhgd,bhnd->bhgn", q, self.k.float())

    def values(self):
        return self.v.float()

    def bytes_per_token(self):
        return 2 * self.heads * self.head_dim * torch.finfo(self.dtype).bits // 8


class Int8Cache(KVCache):
    """K and V as symmetric int8 with one fp16 scale per KV_GROUP_SIZE channels."""

    def allocate(self):
        g = self.head_dim // self.cfg.group_size
        self.buffer("k_q", self.head_dim, dtype=torch.int8)
        self.buffer("k_s", g, dtype=torch.float16)
        self.buffer("v_q", self.head_dim, dtype=torch.int8)
        self.buffer("v_s", g, dtype=torch.float16)

    def write(self, k, v, slots):
        for name, x in (("k", k), ("v", v)):
            q, s = group_quantize(x, self.cfg.group_size, 8)
            self.store(f"{name}_q", slots, q)
            self.store(f"{name}_s", slots, s)

    def scores(self, q):
        return torch.einsum("bhgd,bhnd->bhgn", q, group_dequantize(self.k_q, self.k_s, self.cfg.group_size))

    def values(self):
        return group_dequantize(self.v_q, self.v_s, self.cfg.group_size)

    def bytes_per_token(self):
        return 2 * self.heads * (self.head_dim + 2 * self.head_dim // self.cfg.group_size)


class QJLCache(KVCache):
    """Keys as sign(S k) bits (m = KV_QJL_DIM, packed 8 per byte) and ||k|| in fp16; the score
    sqrt(pi/2)/m * ||k|| * <S q, sign(S k)> is an unbiased estimate of q.k for Gaussian S.
    Values group-quantized to KV_VALUE_BITS."""

    def allocate(self):
        m, g = self.cfg.qjl_dim, self.head_dim // self.cfg.group_size
        self.sketch = qjl_sketch(self.head_dim, m, self.cfg.seed * 1000 + self.layer, self.device)
        self.extra_bytes = self.sketch.numel() * 4
        self.buffer("k_bits", m // 8, dtype=torch.uint8)
        self.buffer("k_norm", dtype=torch.float16)
        width = self.head_dim if self.cfg.value_bits == 8 else self.head_dim // 2
        self.buffer("v_q", width, dtype=torch.int8 if self.cfg.value_bits == 8 else torch.uint8)
        self.buffer("v_s", g, dtype=torch.float16)

    def write(self, k, v, slots):
        kf = k.float()
        self.store("k_bits", slots, pack_signs(kf @ self.sketch.T))
        self.store("k_norm", slots, kf.norm(dim=-1).half())
        q, s = group_quantize(v, self.cfg.group_size, self.cfg.value_bits)
        self.store("v_q", slots, q if self.cfg.value_bits == 8 else pack_nibbles(q))
        self.store("v_s", slots, s)

    def scores(self, q):
        sq = q @ self.sketch.T
        est = torch.einsum("bhgm,bhnm->bhgn", sq, unpack_signs(self.k_bits))
        return est * (math.sqrt(math.pi / 2) / self.cfg.qjl_dim) * self.k_norm.float()[:, :, None, :]

    def values(self):
        q = self.v_q if self.cfg.value_bits == 8 else unpack_nibbles(self.v_q)
        return group_dequantize(q, self.v_s, self.cfg.group_size)

    def bytes_per_token(self):
        value_bytes = self.head_dim * self.cfg.value_bits // 8 + 2 * self.head_dim // self.cfg.group_size
        return self.heads * (self.cfg.qjl_dim // 8 + 2 + value_bytes)


class QJLRecentKCache(QJLCache):
    """QJL, except the newest KV_RECENT_EXACT_TOKENS keys, which are scored exactly from a small ring."""

    def allocate(self):
        super().allocate()
        r = self.cfg.recent_exact_tokens
        self.k_recent = torch.zeros(self.batch, self.heads, r, self.head_dim, dtype=self.dtype, device=self.device)
        self.slot_pos = torch.zeros(self.batch, self.capacity, dtype=torch.int64, device=self.device)
        self.newest = torch.zeros(self.batch, dtype=torch.int64, device=self.device)
        self.extra_bytes += self.k_recent.numel() * self.k_recent.element_size() + self.slot_pos.numel() * 8

    def append(self, k, v, positions):
        super().append(k, v, positions)
        self.k_recent[self.rows, :, positions % self.cfg.recent_exact_tokens] = k.to(self.dtype)
        self.slot_pos[self.rows, positions % self.capacity] = positions
        self.newest.copy_(positions)

    def scores(self, q):
        r = self.cfg.recent_exact_tokens
        exact = torch.einsum("bhgd,bhrd->bhgr", q, self.k_recent.float())
        idx = (self.slot_pos % r)[:, None, None, :].expand(-1, self.heads, q.shape[2], -1)
        recent = (self.newest[:, None] - self.slot_pos) < r
        return torch.where(recent[:, None, None, :], exact.gather(-1, idx), super().scores(q))


# -----------------------------------------------------------------------------
# Triton kernels. Key modes: 0 = int8 groups, 1 = QJL sign bits. Values: int8 or 4-bit groups.
# -----------------------------------------------------------------------------

KEY_INT8, KEY_QJL = 0, 1

if triton is not None:

    @triton.jit
    def _group_quantize(x, GROUP: tl.constexpr, QMAX: tl.constexpr):
        """x (D,) fp32 -> (codes (D,) fp32 in [-QMAX, QMAX], fp16-rounded scales (D // GROUP,))."""
        D: tl.constexpr = x.shape[0]
        xg = tl.reshape(x, (D // GROUP, GROUP))
        scale = tl.maximum(tl.max(tl.abs(xg), axis=1) / QMAX, 1e-8).to(tl.float16).to(tl.float32)
        q = tl.floor(xg / scale[:, None] + 0.5)
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
        return tl.reshape(q, (D,)), scale

    @triton.jit
    def _store_group_quantized(x, q_ptr, s_ptr, GROUP: tl.constexpr, BITS: tl.constexpr):
        D: tl.constexpr = x.shape[0]
        q, scale = _group_quantize(x, GROUP, 2 ** (BITS - 1) - 1)
        if BITS == 8:
            tl.store(q_ptr + tl.arange(0, D), q.to(tl.int8))
        else:
            lo, hi = tl.split(tl.reshape((q + 8).to(tl.int32), (D // 2, 2)))
            tl.store(q_ptr + tl.arange(0, D // 2), (lo | (hi << 4)).to(tl.uint8))
        tl.store(s_ptr + tl.arange(0, D // GROUP), scale.to(tl.float16))

    @triton.jit
    def _kv_write_kernel(k_ptr, v_ptr, pos_ptr, kq_ptr, ks_ptr, vq_ptr, vs_ptr, sketch_ptr, H, CAP,
                         KEY_MODE: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, VBITS: tl.constexpr,
                         M: tl.constexpr):
        """One program per (row, KV head): quantize the new token's K and V and write them at slot pos % CAP."""
        b, h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        slot = tl.load(pos_ptr + b).to(tl.int64) % CAP
        entry = (b * H + h) * CAP + slot
        offs = tl.arange(0, D)
        k = tl.load(k_ptr + (b * H + h) * D + offs).to(tl.float32)
        v = tl.load(v_ptr + (b * H + h) * D + offs).to(tl.float32)
        if KEY_MODE == 0:
            _store_group_quantized(k, kq_ptr + entry * D, ks_ptr + entry * (D // GROUP), GROUP, 8)
        else:
            offs_m = tl.arange(0, M)
            sk = tl.sum(tl.load(sketch_ptr + offs_m[:, None] * D + offs[None, :]) * k[None, :], axis=1)
            bits = tl.reshape((sk >= 0).to(tl.int32), (M // 8, 8)) << tl.arange(0, 8)[None, :]
            tl.store(kq_ptr + entry * (M // 8) + tl.arange(0, M // 8), tl.sum(bits, axis=1).to(tl.uint8))
            tl.store(ks_ptr + entry, tl.sqrt(tl.sum(k * k, axis=0)).to(tl.float16))
        vwidth: tl.constexpr = D if VBITS == 8 else D // 2
        _store_group_quantized(v, vq_ptr + entry * vwidth, vs_ptr + entry * (D // GROUP), GROUP, VBITS)

    @triton.jit
    def _load_keys_scores(q, kq_ptr, ks_ptr, entry, nmask, KEY_MODE: tl.constexpr, D: tl.constexpr,
                          GROUP: tl.constexpr, M: tl.constexpr):
        """Scores (BLOCK_H, BLOCK_N) of q against a block of cached keys, dequantized in registers.
        For QJL, q is the sketched query S q (BLOCK_H, M)."""
        if KEY_MODE == 0:
            offs = tl.arange(0, D)
            k = tl.load(kq_ptr + entry[:, None] * D + offs[None, :], mask=nmask[:, None], other=0).to(tl.float32)
            k = k * tl.load(ks_ptr + entry[:, None] * (D // GROUP) + offs[None, :] // GROUP, mask=nmask[:, None],
                            other=0).to(tl.float32)
            return tl.dot(q, tl.trans(k))
        else:
            offs = tl.arange(0, M)
            byte = tl.load(kq_ptr + entry[:, None] * (M // 8) + offs[None, :] // 8, mask=nmask[:, None], other=0)
            sign = ((byte.to(tl.int32) >> (offs[None, :] % 8)) & 1).to(tl.float32) * 2.0 - 1.0
            norm = tl.load(ks_ptr + entry, mask=nmask, other=0).to(tl.float32)
            return tl.dot(q, tl.trans(sign)) * (norm[None, :] * (1.2533141373155003 / M))

    @triton.jit
    def _load_values(vq_ptr, vs_ptr, entry, nmask, D: tl.constexpr, GROUP: tl.constexpr, VBITS: tl.constexpr):
        offs = tl.arange(0, D)
        if VBITS == 8:
            v = tl.load(vq_ptr + entry[:, None] * D + offs[None, :], mask=nmask[:, None], other=0).to(tl.float32)
        else:
            byte = tl.load(vq_ptr + entry[:, None] * (D // 2) + offs[None, :] // 2, mask=nmask[:, None], other=0)
            v = ((byte.to(tl.int32) >> ((offs[None, :] % 2) * 4)) & 15).to(tl.float32) - 8.0
        return v * tl.load(vs_ptr + entry[:, None] * (D // GROUP) + offs[None, :] // GROUP, mask=nmask[:, None],
                           other=0).to(tl.float32)

    @triton.jit
    def _attend_stage1_kernel(q_ptr, kq_ptr, ks_ptr, vq_ptr, vs_ptr, len_ptr, mid_o_ptr, mid_lse_ptr, H, CAP, CHUNK,
                              sm_scale, G: tl.constexpr, KEY_MODE: tl.constexpr, QD: tl.constexpr, D: tl.constexpr,
                              GROUP: tl.constexpr, VBITS: tl.constexpr, M: tl.constexpr, BLOCK_H: tl.constexpr,
                              BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr):
        """Program (row, KV head, split): online softmax over its slice of the filled length for all
        G query heads of that KV head; writes the partial output and its log-sum-exp."""
        b, h, sp = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2)
        length = tl.load(len_ptr + b)
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, length)
        offs_h = tl.arange(0, BLOCK_H)
        hmask = offs_h < G
        heads = h * G + offs_h
        q = tl.load(q_ptr + (b * H * G + heads)[:, None] * QD + tl.arange(0, QD)[None, :], mask=hmask[:, None],
                    other=0).to(tl.float32)
        m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, D), tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            entry = (b * H + h) * CAP + offs_n
            s = _load_keys_scores(q, kq_ptr, ks_ptr, entry, nmask, KEY_MODE, D, GROUP, M) * sm_scale
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = _load_values(vq_ptr, vs_ptr, entry, nmask, D, GROUP, VBITS)
            acc = acc * alpha[:, None] + tl.dot(p, v)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        filled = l_i > 0
        out = acc / tl.where(filled, l_i, 1.0)[:, None]
        lse = tl.where(filled, m_i + tl.log(tl.where(filled, l_i, 1.0)), float("-inf"))
        part = (b * H * G + heads) * NSPLIT + sp
        tl.store(mid_o_ptr + part[:, None] * D + tl.arange(0, D)[None, :], out, mask=hmask[:, None])
        tl.store(mid_lse_ptr + part, lse, mask=hmask)

    @triton.jit
    def _attend_stage2_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, D: tl.constexpr, NSPLIT: tl.constexpr):
        """Program per (row, query head): merge the splits' partial outputs by their log-sum-exp."""
        row = tl.program_id(0).to(tl.int64)
        offs_s = tl.arange(0, NSPLIT)
        lse = tl.load(mid_lse_ptr + row * NSPLIT + offs_s)
        top = tl.max(lse, axis=0)
        w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - tl.where(top == float("-inf"), 0.0, top)))
        o = tl.load(mid_o_ptr + (row * NSPLIT + offs_s)[:, None] * D + tl.arange(0, D)[None, :])
        total = tl.sum(w, axis=0)
        out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)  # an empty cache attends to nothing: 0
        tl.store(out_ptr + row * D + tl.arange(0, D), out.to(out_ptr.dtype.element_ty))


def split_plan(batch: int, heads: int, capacity: int, block_n: int, device) -> tuple[int, int]:
    """(splits, chunk): about four programs per SM; static for a given cache, so CUDA graphs can replay it."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if torch.device(device).type == "cuda" else 8
    splits = triton.next_power_of_2(max(1, -(-4 * sms // (batch * heads))))
    splits = max(1, min(splits, 64, triton.next_power_of_2(-(-capacity // block_n))))
    chunk = -(-capacity // splits)
    return splits, -(-chunk // block_n) * block_n


class TritonAttendMixin:
    """append/attend through the Triton kernels over the reference backend's own buffers."""

    key_mode: int
    block_n = 64

    def kernel_buffers(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def value_bits(self) -> int:
        raise NotImplementedError

    def _plan(self):
        if not hasattr(self, "_mid"):
            self.splits, self.chunk = split_plan(self.batch, self.heads, self.capacity, self.block_n, self.device)
            self._mid = (torch.empty(self.batch * self.q_heads * self.splits, self.head_dim, device=self.device),
                         torch.empty(self.batch * self.q_heads * self.splits, device=self.device))
        return self._mid

    def append(self, k, v, positions):
        positions = positions.contiguous()  # the kernel indexes row b at pos_ptr + b; an expanded view has stride 0
        kq, ks, vq, vs = self.kernel_buffers()
        sketch = getattr(self, "sketch", kq)
        _kv_write_kernel[(self.batch, self.heads)](
            k.contiguous(), v.contiguous(), positions, kq, ks, vq, vs, sketch, self.heads, self.capacity,
            KEY_MODE=self.key_mode, D=self.head_dim, GROUP=self.cfg.group_size, VBITS=self.value_bits(),
            M=self.cfg.qjl_dim)
        self.lengths.copy_(torch.clamp(positions + 1, max=self.capacity))

    def attend(self, q):
        mid_o, mid_lse = self._plan()
        g = self.q_heads // self.heads
        qk = (q.float() @ self.sketch.T) if self.key_mode == KEY_QJL else q
        kq, ks, vq, vs = self.kernel_buffers()
        _attend_stage1_kernel[(self.batch, self.heads, self.splits)](
            qk.contiguous(), kq, ks, vq, vs, self.lengths, mid_o, mid_lse, self.heads, self.capacity, self.chunk,
            self.sm_scale, G=g, KEY_MODE=self.key_mode, QD=qk.shape[-1], D=self.head_dim, GROUP=self.cfg.group_size,
            VBITS=self.value_bits(), M=self.cfg.qjl_dim, BLOCK_H=max(16, triton.next_power_of_2(g)),
            BLOCK_N=self.block_n, NSPLIT=self.splits, num_warps=4, num_stages=3)
        out = torch.empty(self.batch, self.q_heads, self.head_dim, device=self.device, dtype=q.dtype)
        _attend_stage2_kernel[(self.batch * self.q_heads,)](mid_o, mid_lse, out, D=self.head_dim, NSPLIT=self.splits)
        return out


class Int8TritonCache(TritonAttendMixin, Int8Cache):
    key_mode = KEY_INT8

    def kernel_buffers(self):
        return self.k_q, self.k_s, self.v_q, self.v_s

    def value_bits(self):
        return 8


class QJLTritonCache(TritonAttendMixin, QJLCache):
    key_mode = KEY_QJL

    def kernel_buffers(self):
        return self.k_bits, self.k_norm, self.v_q, self.v_s

    def value_bits(self):
        return self.cfg.value_bits


KV_BACKENDS: dict[str, type[KVCache]] = {
    "bf16": ExactCache,
    "int8": Int8Cache,
    "int8_triton": Int8TritonCache,
    "qjl": QJLCache,
    "qjl_triton": QJLTritonCache,
    "qjl_recentk": QJLRecentKCache,
}
TORCH_REFERENCE = {"int8_triton": "int8", "qjl_triton": "qjl"}


def make_kv_cache(name: str, *args, **kwargs) -> KVCache:
    if name not in KV_BACKENDS:
        raise ValueError(f"KV backend {name!r} is unknown; valid backends: {', '.join(KV_BACKENDS)}")
    if name in TORCH_REFERENCE and triton is None:
        raise RuntimeError(f"KV backend {name!r} needs triton; install it or use {TORCH_REFERENCE[name]!r}")
    return KV_BACKENDS[name](*args, **kwargs)
