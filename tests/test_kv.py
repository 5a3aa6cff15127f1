"""KV-cache backends: Triton kernels (TRITON_INTERPRET=1 on CPU) against their torch references,
QJL statistics, int8 accuracy, sizes and the registry."""

import math
import os
import re

import pytest
import torch

import triton_kv_ops as kv
from conftest import ROOT, load_benchmark

# With a GPU and TRITON_INTERPRET=0 the same tests compile the kernels for it: they then check the paths that only
# the GPU runs (the int8 decoder's PTX) against the torch references.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

CFG = kv.KVConfig(group_size=32, qjl_dim=128, value_bits=4, seed=3)
FP16_DOT = dict(rtol=2e-3, atol=2e-3)  # the kernels' dot operands are fp16 (rounding 2^-11), accumulation fp32
TRITON_BACKENDS = list(kv.TORCH_REFERENCE)  # every Triton backend, each tested against its torch reference


@pytest.fixture(autouse=True)
def on_device():
    with torch.device(DEVICE):
        yield


def codes(cache, key):
    """A buffer's codes one per entry: sign bits and nibbles unpacked, so one code off by one step reads as 1."""
    t = cache.buffers[key]
    if key == "k_bits":
        return kv.unpack_signs(t)
    if key in ("k_codes", "v_codes"):  # tq4's sign and magnitude -> the centroid's rank: neighbours differ by 1
        c = kv.tq4_unpack(t)
        return torch.where(c >= 8, 7 - (c & 7), 8 + c)
    return kv.unpack_nibbles(t) if t.dtype == torch.uint8 else t


def assert_same_codes(fast, ref, key, share):
    """Integer codes agree except near a rounding boundary: under `share` of them differ, by one step at most."""
    mismatch = (codes(fast, key).float() - codes(ref, key).float()).abs()
    step = 2 if key == "k_bits" else 1  # a flipped sign moves -1 to 1
    assert (mismatch > 0).float().mean() < share and mismatch.max() <= step, key


def filled(name, lengths, hkv, g, d, cap, cfg=CFG, seed=0):
    """A cache of `name` whose rows hold `lengths` random tokens, filled by appends of the reference path."""
    torch.manual_seed(seed)
    b = len(lengths)
    cache = kv.make_kv_cache(name, b, hkv, hkv * g, cap, d, DEVICE, torch.float32, cfg)
    for t in range(max(lengths)):
        pos = torch.tensor([min(t, max(n - 1, 0)) for n in lengths])
        cache.append(torch.randn(b, hkv, d), torch.randn(b, hkv, d), pos)
    cache.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
    return cache


@pytest.mark.parametrize("name", TRITON_BACKENDS)
@pytest.mark.parametrize("regime", ["latency", "bandwidth"])
@pytest.mark.parametrize("lengths, g, d", [([37, 1, 0], 2, 64), ([70], 1, 64), ([5, 129], 4, 128), ([0], 4, 64)])
def test_triton_attend_matches_reference(name, regime, lengths, g, d):
    ref = filled(kv.TORCH_REFERENCE[name], lengths, 2, g, d, cap=192)
    fast = kv.make_kv_cache(name, len(lengths), 2, 2 * g, 192, d, DEVICE, torch.float32, CFG)
    fast.relaunch(fast.launch[regime])
    for key in ref.buffers:
        fast.buffers[key].copy_(ref.buffers[key])
    fast.lengths.copy_(ref.lengths)
    q = torch.randn(len(lengths), 2 * g, d)
    expected, got = ref.attend(q), fast.attend(q)
    torch.testing.assert_close(got, expected, **FP16_DOT)
    assert torch.equal(fast.attend(q), got)  # the split counters reset themselves for the next step
    empty = torch.tensor(lengths) == 0
    assert torch.all(got[empty] == 0)


@pytest.mark.parametrize("registers, shared, warps, want", [
    (168, 15872, 1, 12),  # tq4's bandwidth launch (triton 3.6's sm_90 build): registers bind
    (155, 15872, 2, 6),  # tq4's latency launch: 155 registers take 160 a thread
    (158, 26624, 1, 8),  # int8's bandwidth launch: shared memory binds, 8 x 27,648 B of 228 KiB
    (32, 0, 1, 32)])  # the SM's 32 programs bind
def test_programs_an_sm_within_hoppers_limits(registers, shared, warps, want):
    assert kv.programs_an_sm(registers, shared, warps) == want


@pytest.mark.skipif(DEVICE != "cuda", reason="reads the attention kernel's GPU build")
@pytest.mark.parametrize("name", TRITON_BACKENDS)
@pytest.mark.parametrize("regime", ["latency", "bandwidth"])
def test_declared_launches_build_without_spills(name, regime):
    """Each backend's declared launch, at the model's shape (head_dim 64, 2 query heads a KV head, bf16), compiles
    with no register spilled to local memory and within its register cap: a kernel change that spills shows here,
    not only as a slower sweep."""
    batch = 64 if regime == "bandwidth" else 1
    cache = kv.make_kv_cache(name, batch, 4, 8, 1024, 64, DEVICE, torch.bfloat16, kv.KVConfig())
    cache.relaunch(cache.launch[regime])
    cache.attend(cache.as_query(torch.randn(batch, 8, 64, dtype=torch.bfloat16)))
    report, cap = cache.build_report(), cache.launch[regime][4]
    assert report["spills"] == 0 and report["registers"] <= (cap or 255), report


def test_qjl_triton_with_int8_values_attends_as_its_reference():
    """QJL keys beside int8 values (VALUE_BITS=8): the values take the int8 decoder inside the QJL kernel."""
    cfg = kv.KVConfig(group_size=32, qjl_dim=64, value_bits=8, seed=2)
    ref = filled("qjl", [33, 7], 2, 2, 128, cap=48, cfg=cfg)
    fast = kv.make_kv_cache("qjl_triton", 2, 2, 4, 48, 128, DEVICE, torch.float32, cfg)
    for key in ref.buffers:
        fast.buffers[key].copy_(ref.buffers[key])
    fast.lengths.copy_(ref.lengths)
    q = torch.randn(2, 4, 128)
    torch.testing.assert_close(fast.attend(q), ref.attend(q), **FP16_DOT)


@pytest.mark.parametrize("name, d, value_bits", [("bf16_triton", 64, 4), ("int8_triton", 64, 8), ("qjl_triton", 64, 4),
                                                  ("qjl_triton", 128, 8), ("qjl_recentk_triton", 64, 4),
                                                  ("tq4_triton", 64, 4), ("tq4_triton", 128, 4)])
@pytest.mark.parametrize("write_group", [1, 2])
def test_triton_write_matches_reference(name, d, value_bits, write_group):
    cfg = kv.KVConfig(group_size=32, qjl_dim=64, value_bits=value_bits, seed=1)
    ref = kv.make_kv_cache(kv.TORCH_REFERENCE[name], 3, 2, 4, 64, d, DEVICE, torch.float32, cfg)
    fast = kv.make_kv_cache(name, 3, 2, 4, 64, d, DEVICE, torch.float32, cfg)
    fast.relaunch(write_settings=(write_group, 2))  # KV heads a program, warps
    for t in range(70):  # past capacity: the ring wraps
        k, v, pos = torch.randn(3, 2, d) * 3, torch.randn(3, 2, d), torch.tensor([t, t + 3, 2 * t])
        ref.append(k, v, pos)
        fast.append(k, v, pos)
    for key in ref.buffers:
        if ref.buffers[key].is_floating_point():
            torch.testing.assert_close(fast.buffers[key], ref.buffers[key], rtol=1e-3, atol=1e-5)
        else:
            assert_same_codes(fast, ref, key, 1e-3)
    assert torch.equal(fast.lengths, ref.lengths) and fast.lengths.tolist() == [64, 64, 64]


def test_write_settings_must_divide_the_kv_heads():
    cache = kv.make_kv_cache("int8_triton", 1, 4, 8, 16, 64, DEVICE, torch.float32, CFG)
    cache.relaunch(write_settings=(3, 2))
    with pytest.raises(ValueError, match="3 KV heads a program do not divide the cache's 4"):
        cache.append(torch.randn(1, 4, 64), torch.randn(1, 4, 64), torch.tensor([0]))


def test_qjl_score_is_unbiased_and_variance_falls_like_1_over_m():
    torch.manual_seed(0)
    d = 64
    q, k = torch.randn(d), torch.randn(d)
    exact = float(q @ k)
    var = {}
    for m in (64, 256):
        est = []
        for seed in range(800):
            s = kv.qjl_sketch(d, m, seed, DEVICE).float()
            signs = kv.unpack_signs(kv.pack_signs(s @ k))
            est.append(math.sqrt(math.pi / 2) / m * float(k.norm()) * float((s @ q) @ signs))
        est = torch.tensor(est, dtype=torch.float64)
        se = float(est.std() / math.sqrt(len(est)))
        assert abs(float(est.mean()) - exact) < 4 * se, (m, float(est.mean()), exact, se)
        var[m] = float(est.var())
    assert 2.8 < var[64] / var[256] < 5.5, var


def test_int8_decoder_is_exact_for_every_code():
    """The kernels decode int8 codes a word at a time through fp16 bit patterns, not conversions: every one of the
    256 codes at every byte of a word, back in channel order."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode(codes_ptr, out_ptr, D: tl.constexpr):
        rows = tl.arange(0, 16)
        even, odd = kv._int8_halves(codes_ptr, rows, rows < 16, D)
        channels = tl.reshape(tl.join(even, odd), (16, D))
        tl.store(out_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], channels)

    word, byte = torch.arange(256)[:, None], torch.arange(4)[None, :]
    codes = ((word + 37 * byte) % 256 - 128).to(torch.int8).reshape(16, 64)  # byte i of the 256 words: every code
    out = torch.empty(16, 64, dtype=torch.float16)
    decode[(1,)](codes, out, D=64)
    assert torch.equal(out, codes.half())


def test_tq4_decoder_is_exact_for_every_code():
    """The kernels decode tq4 codes a word (8 codes) at a time: every one of the 16 codes at every nibble of a word,
    back in channel order, as the fp16 centroid times the row's scale."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode(codes_ptr, scale_ptr, tables_ptr, out_ptr, D: tl.constexpr):
        rows = tl.arange(0, 16)
        even, odd = kv._tq4_halves(codes_ptr, scale_ptr, rows, rows < 16, kv._tq4_tables(tables_ptr, D // 8, D), D)
        channels = tl.reshape(tl.join(even, odd), (16, D))
        tl.store(out_ptr + rows[:, None] * D + tl.arange(0, D)[None, :], channels)

    channel = torch.arange(16 * 64).reshape(16, 64)
    code = (channel + channel // 8 * 3) % 16  # nibble i of the 128 words: every code
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8)
    scale = torch.tensor([1.0, 0.5, -2.0, 0.25] * 4, dtype=torch.float16)
    out = torch.empty(16, 64, dtype=torch.float16)
    mse = kv.TurboQuantMSE(64, 0, DEVICE)
    decode[(1,)](packed, scale, mse.decoder_tables, out, D=64)
    assert torch.equal(out, mse.centroids.half()[code] * scale[:, None])


@pytest.mark.parametrize("n", [64, 128])
def test_tq4_value_tiles_decode_to_the_references_values(n):
    """A block of one or two tiles of tq4 values, every code at every nibble: the kernels' groups of the decoded
    tiles (the tensor-core operands, channels by entries) hold the fp16 centroids of the codes the torch reference
    reads, entry for entry, and the entries' scales come beside them."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode(codes_ptr, scale_ptr, tables_ptr, out_ptr, scale_out_ptr, D: tl.constexpr, N: tl.constexpr):
        entry = tl.arange(0, N)
        tile_word = tl.arange(0, N // 8) // 8 * 8 * D  # the first word of each word column's tile
        even, odd, scale = kv._tq4_value_groups(codes_ptr, scale_ptr, tile_word, entry, entry < N,
                                                kv._tq4_tables(tables_ptr, N // 8, D), D)
        channel = 2 * tl.arange(0, D // 2)[:, None]
        for g in tl.static_range(4):  # group g: entries 16 g .. 16 g + 15 of each tile
            j = tl.arange(0, N // 4)[None, :]
            at = out_ptr + (j // 16 * 64 + 16 * g + j % 16) * D + channel
            tl.store(at, even[g])
            tl.store(at + 1, odd[g])
        tl.store(scale_out_ptr + entry[:, None], scale)

    d = 64
    gen = torch.Generator().manual_seed(2)
    cache = kv.make_kv_cache("tq4", 1, 1, 1, n, d, DEVICE, torch.float32, kv.KVConfig(recent_exact_tokens=0))
    cache.v_codes.copy_(torch.randint(0, 256, cache.v_codes.shape, generator=gen, dtype=torch.uint8, device="cpu"))
    cache.v_scale.copy_(torch.rand(cache.v_scale.shape, generator=gen, device="cpu").half() + 0.5)
    out = torch.empty(n, d, dtype=torch.float16)
    scale = torch.empty(n, 1)
    decode[(1,)](cache.v_codes, cache.v_scale, cache.mse.decoder_tables, out, scale, D=d, N=n)
    codes = cache.value_codes()[0, 0]
    assert len(set(codes.flatten().tolist())) == 16
    assert torch.equal(out, cache.mse.centroids.half()[codes]) and torch.equal(scale[:, 0], cache.v_scale[0, 0].float())


def run_ptx(ptx: str, inputs: dict[str, int]) -> dict[str, int]:
    """The b32 PTX subset the decoders' inline assembly uses (mov, and, or, xor, shl, shr, prmt in its default mode),
    run on Python ints: the GPU-only path checked on any machine. -> every register, halves of {lo, hi} pairs too."""
    def prmt(a, b, sel):
        pool, out = a | (b << 32), 0
        for i in range(4):
            nib = (sel >> 4 * i) & 15
            byte = (pool >> 8 * (nib & 7)) & 0xFF
            out |= ((0xFF if byte & 0x80 else 0) if nib & 8 else byte) << 8 * i  # bit 3: replicate the sign
        return out

    ops = {"mov": lambda a: a, "and": lambda a, b: a & b, "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b,
           "shl": lambda a, b: (a << b) & 0xFFFFFFFF, "shr": lambda a, b: a >> b, "prmt": prmt}
    regs = dict(inputs)
    for stmt in ptx.strip().removeprefix("{").removesuffix("}").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        assert op.endswith(".b32"), stmt
        if args.startswith("{"):  # mov.b32 {low, high}, pair
            halves, src = args[1:].split("}, ")
            low, high = (h.strip() for h in halves.split(","))
            regs[low], regs[high] = regs[src] & 0xFFFF, regs[src] >> 16
            continue
        dst, *srcs = (a.strip() for a in args.split(","))
        regs[dst] = ops[op.removesuffix(".b32")](*(regs[a] if a in regs else int(a, 0) for a in srcs))
    return regs


def test_tq4_decode_ptx_gives_each_codes_fp16_centroid():
    table = torch.tensor(kv.tq4_magnitudes(), dtype=torch.float16, device="cpu")
    table = (torch.cat((table, -table)).view(torch.int16).int() & 0xFFFF).tolist()  # fp16 bits by code
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2 ** 32, (2000,), generator=gen, dtype=torch.int64, device="cpu").tolist()
    words += [0, 0xFFFFFFFF, 0x89ABCDEF]
    channels = (0, 2, 1, 3, 4, 6, 5, 7)  # output k holds this nibble: an fp16 register pair holds 2 channels of a half
    tables = {f"${9 + i}": w & 0xFFFFFFFF for i, w in enumerate(kv.tq4_byte_tables())}  # operands, as the kernel loads
    for w in words:
        regs = run_ptx(kv.TQ4_DECODE_PTX.value, {"$8": w, **tables})
        assert [regs[f"${k}"] for k in range(8)] == [table[(w >> 4 * c) & 15] for c in channels], hex(w)


def test_int8_decode_ptx_gives_fp16_of_1152_plus_each_code():
    gen = torch.Generator().manual_seed(0)
    for w in torch.randint(0, 2 ** 32, (2000,), generator=gen, dtype=torch.int64, device="cpu").tolist():
        regs = run_ptx(kv.INT8_DECODE_PTX.value, {"$4": w})
        codes = [((w >> 8 * k) & 0xFF) ^ 0x80 for k in (0, 2, 1, 3)]  # the signed code plus 128, even channels first
        want = torch.tensor([1024.0 + c for c in codes], dtype=torch.float16, device="cpu").view(torch.int16)
        assert [regs[f"${k}"] for k in range(4)] == want.tolist(), hex(w)  # 0x64xx: positive as int16


def test_sign_table_rows_are_the_unpacked_nibbles():
    table = kv.sign_table(DEVICE).reshape(16, 4).float()
    assert torch.equal(table, kv.unpack_signs(torch.arange(16, dtype=torch.uint8)).reshape(16, 8)[:, :4])


def test_qjl_cache_score_is_unbiased_and_beats_plain_qjl():
    """The qjl cache's estimator, tq4 codes plus QJL on their residual, averaged over sketches (the rotation
    fixed) is q.k within a few standard errors; its noise is the residual's, far below plain QJL's at the
    same sketch size (|r| is about 0.1 |k|)."""
    torch.manual_seed(0)
    d, m = 64, 32
    q, k = torch.randn(1, 1, d), torch.randn(1, 1, d)
    exact = float((q * k).sum())
    cache = kv.make_kv_cache("qjl", 1, 1, 1, 4, d, DEVICE, torch.float32, kv.KVConfig(qjl_dim=m))
    est, plain = [], []
    for seed in range(1000):
        cache.sketch = kv.qjl_sketch(d, m, seed, DEVICE)
        cache.append(k, torch.zeros(1, 1, d), torch.zeros(1, dtype=torch.int64))
        est.append(float(cache.scores(q[:, :, None])[0, 0, 0, 0]))
        s = cache.sketch.float()
        signs = kv.unpack_signs(kv.pack_signs(s @ k[0, 0]))
        plain.append(math.sqrt(math.pi / 2) / m * float(k.norm()) * float((s @ q[0, 0]) @ signs))
    est = torch.tensor(est, dtype=torch.float64)
    se = float(est.std() / math.sqrt(len(est)))
    assert abs(float(est.mean()) - exact) < 4 * se, (float(est.mean()), exact, se)
    assert float(est.std()) < 0.25 * float(torch.tensor(plain).std())


def test_int8_attention_stays_within_a_stated_bound_of_exact():
    """Stated bound: relative L2 error of the attention output <= 2% at head_dim 64, group 32 (measured 1.1%)."""
    exact = filled("bf16", [300, 77], 4, 2, 64, 320, seed=5)
    quant = filled("int8", [300, 77], 4, 2, 64, 320, seed=5)
    q = torch.randn(2, 8, 64) * 2
    a, b = exact.attend(q), quant.attend(q)
    assert float((a - b).norm() / a.norm()) < 0.02


def test_bytes_per_token_against_bf16():
    shape = (1, 4, 8, 64, 64, DEVICE)
    bf16 = kv.make_kv_cache("bf16", *shape, torch.bfloat16).bytes_per_token()
    int8 = kv.make_kv_cache("int8", *shape, torch.bfloat16).bytes_per_token()
    qjl = kv.make_kv_cache("qjl", *shape, torch.bfloat16).bytes_per_token()
    assert bf16 == 2 * 4 * 64 * 2 and int8 / bf16 == pytest.approx(0.53, abs=0.005)
    assert qjl == 4 * (32 + 2 + 4 + 2 + 32 + 4) and qjl / bf16 <= 0.30  # the bound
    for recent in (0, 8):  # TurboQuant's codes alone; and with the rings of the 8 newest keys and values
        cfg = kv.KVConfig(recent_exact_tokens=recent)
        tq4 = kv.make_kv_cache("tq4", 1, 4, 8, 1024, 64, DEVICE, torch.bfloat16, cfg)  # the eval's capacity
        per_slot = sum(t.numel() * t.element_size() for name, t in tq4.buffers.items()
                       if name not in ("k_recent", "v_recent", "newest")) // 1024  # codes and scales
        rings = sum(tq4.buffers[name].numel() * 2 for name in ("k_recent", "v_recent") if recent)  # bf16, a row's
        assert tq4.bytes_per_token() == per_slot + rings // 1024
        assert tq4.bytes_per_token() / bf16 == pytest.approx((0.266, 0.273)[recent > 0], abs=0.001)  # bound: 0.28
    recentk = kv.make_kv_cache("qjl_recentk", 1, 4, 8, 1024, 64, DEVICE, torch.bfloat16)  # its own ring of 6 keys
    assert recentk.bytes_per_token() == qjl + 4 * 6 * 64 * 2 // 1024 and recentk.bytes_per_token() / bf16 <= 0.30


@pytest.mark.parametrize("name, own", [("tq4", 8), ("tq4_triton", 8), ("qjl_recentk", 6), ("qjl_recentk_triton", 6),
                                       ("int8_triton", 0)])
def test_each_backend_keeps_its_own_ring_unless_the_config_sets_one(name, own):
    import train_gpt as tg

    def ring(cfg):
        return kv.make_kv_cache(name, 1, 2, 4, 64, 64, DEVICE, torch.float32, cfg).recent

    settings = [tg.Hyperparameters.from_env(env).ar_eval_settings().cache
                for env in ({}, {"KV_RECENT_EXACT_TOKENS": "3"}, {"KV_RECENT_EXACT_TOKENS": "0"})]
    assert [ring(cfg) for cfg in settings] == ([own, 3, 0] if own else [0, 0, 0])


@pytest.mark.parametrize("name", ["qjl_recentk", "tq4"])
def test_recent_entries_are_exact(name):
    """The 4 newest keys (qjl_recentk) or keys and values (tq4) are exact; the older ones are coded."""
    cfg = kv.KVConfig(qjl_dim=64, value_bits=8, recent_exact_tokens=4)
    exact = filled("bf16", [10], 1, 2, 64, 16, cfg, seed=2)
    recent = filled(name, [10], 1, 2, 64, 16, cfg, seed=2)
    q = torch.randn(1, 1, 2, 64)
    s_exact, s_recent = exact.scores(q), recent.scores(q)
    torch.testing.assert_close(s_recent[..., 6:10], s_exact[..., 6:10], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(s_recent[..., :6], s_exact[..., :6])
    v_exact, v_recent = exact.values()[:, :, :10], recent.values()[:, :, :10]
    assert torch.allclose(v_recent[:, :, 6:], v_exact[:, :, 6:], atol=1e-5) == (name == "tq4")
    assert not torch.allclose(v_recent[:, :, :6], v_exact[:, :, :6])


@pytest.mark.parametrize("regime", ["latency", "bandwidth"])
@pytest.mark.parametrize("recent", [0, 3, 16])
def test_tq4_triton_ring_of_newest_entries_attends_as_its_reference(recent, regime):
    """tq4_triton without an exact ring (TurboQuant alone), with an odd ring and with a ring of a whole block, over
    rows that wrap the cache's capacity (so their walk from the oldest entry begins inside a tile of values, and with a
    ring of 3 the tile's first entries are coded ones), stay shorter than the ring, and go inactive; split over the
    capacity."""
    cfg = kv.KVConfig(recent_exact_tokens=recent, seed=4)
    torch.manual_seed(5)
    ref = kv.make_kv_cache("tq4", 3, 2, 4, 256, 64, DEVICE, torch.float32, cfg)
    fast = kv.make_kv_cache("tq4_triton", 3, 2, 4, 256, 64, DEVICE, torch.float32, cfg)
    fast.relaunch(fast.launch[regime])
    for t in range(300):
        ref.append(torch.randn(3, 2, 64), torch.randn(3, 2, 64), torch.tensor([t, min(t, 2), t if t < 290 else -1]))
    for key in ref.buffers:
        fast.buffers[key].copy_(ref.buffers[key])
    fast.lengths.copy_(ref.lengths)
    q = torch.randn(3, 4, 64)
    torch.testing.assert_close(fast.attend(q), ref.attend(q), **FP16_DOT)
    assert ref.lengths.tolist() == [256, 3, 256] and fast.splits == 4


def test_tq4_triton_capacity_is_whole_tiles_of_values():
    """tq4_triton reads values in tiles of 64 entries; its torch reference takes any capacity (the last tile padded)."""
    with pytest.raises(ValueError, match="in tiles of 64 entries: a capacity of 40 is not a multiple of 64"):
        kv.make_kv_cache("tq4_triton", 1, 2, 4, 40, 64, DEVICE, torch.float32)
    cache = filled("tq4", [40], 2, 2, 64, 40)
    assert cache.v_codes.shape == (1, 2, 1, 64 * 32) and cache.value_codes().shape == (1, 2, 40, 64)


def test_tq4_value_tiles_hold_each_code_once_where_the_decoder_emits_it():
    """tq4_tile_bytes is a one-to-one map of a tile's (entry, channel) codes onto its nibbles; word w of a channel
    holds entries 16 g + 2 w + k at nibble n(2 g + k) (n swaps bits 0 and 1), whose decoded order (nibbles 0, 2, 1, 3,
    4, 6, 5, 7) is g and k ascending; and a reference cache reads its codes back as written."""
    d = 64
    byte, shift = kv.tq4_tile_bytes(torch.arange(64), d)
    nibble = byte * 2 + shift // 4  # (64, D)
    assert sorted(nibble.flatten().tolist()) == list(range(64 * d))
    decoded_order = [0, 2, 1, 3, 4, 6, 5, 7]
    for c in (0, 1, 37):
        row = c % 2 * (d // 2) + c // 2  # even channels first
        for w in range(8):
            in_word = [int(nibble[16 * g + 2 * w + k, c]) - 8 * (8 * row + w) for g in range(4) for k in range(2)]
            assert [in_word[i] for i in decoded_order] == list(range(8)), (c, w)
    torch.manual_seed(3)
    cache = kv.make_kv_cache("tq4", 1, 2, 2, 128, d, DEVICE, torch.float32)
    values = torch.randn(100, 1, 2, d)
    for t in range(100):
        cache.append(torch.randn(1, 2, d), values[t], torch.tensor([t]))
    expected = kv.tq4_unpack(cache.mse.encode(values)[0]).permute(1, 2, 0, 3)  # (1, 2, 100, D)
    assert torch.equal(cache.value_codes()[:, :, :100], expected)


def test_unknown_backend_lists_the_valid_ones():
    assert {"bf16", "bf16_triton", "int8", "int8_triton", "qjl", "qjl_triton", "qjl_recentk", "qjl_recentk_triton",
            "tq4", "tq4_triton"} == set(kv.KV_BACKENDS)
    with pytest.raises(ValueError, match="valid backends: " + ", ".join(kv.KV_BACKENDS)):
        kv.make_kv_cache("fp4", 1, 1, 1, 8, 64, DEVICE, torch.float32)


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.0", False), ("3.10.1", "2.5.0rc1", False),
    ("2.3.1", "2.4.0", True)])
def test_an_interpreter_that_cannot_run_the_kernels_is_refused_with_the_fix(monkeypatch, triton_version,
                                                                          numpy_version, refused):
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kv.interpreter_problem() is None  # compiled kernels: NumPy plays no part
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    problem = kv.interpreter_problem()
    assert (problem is not None) == refused
    if refused:
        assert f"Triton {triton_version}" in problem and f"NumPy {numpy_version}" in problem
        assert "upgrade triton to 3.7 or later, or install numpy<2.4" in problem
        with pytest.raises(RuntimeError, match=f"KV backend int8_triton: the Triton {triton_version} interpreter"):
            kv.make_kv_cache("int8_triton", 1, 1, 1, 8, 64, "cpu", torch.float32)


def test_every_triton_backend_declares_its_codecs_and_launches():
    for cls in kv.TRITON_BACKENDS:
        cache = cls(2, 2, 4, 64, 64, DEVICE, torch.float32, CFG)
        assert cache.key_codec in ("exact", "int8", "qjl", "tq4") and cache.value_codec in ("exact", "int8", "int4", "tq4")
        assert set(cls.launch) == {"latency", "bandwidth"}, cls.name
        torch_bases = [b for b in cls.__mro__ if b in kv.TORCH_BACKENDS]  # the reference it runs over, and its bases
        assert issubclass(cls, kv.TritonAttendMixin) and kv.TORCH_REFERENCE[cls.name] == torch_bases[0].name


def test_gaussian_lloyd_max_meets_its_conditions():
    """Each centroid is the mean of N(0, 1) over its cell, each boundary the midpoint of its neighbours (the two
    Lloyd-Max conditions), and the distortion is the known 4-bit figure, 0.009497 (Max 1960)."""
    c = torch.tensor(kv.gaussian_lloyd_max(16), dtype=torch.float64)
    edges = torch.cat((torch.tensor([-math.inf]), (c[1:] + c[:-1]) / 2, torch.tensor([math.inf])))
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    pdf = lambda x: torch.where(x.isinf(), torch.zeros_like(x), normal.log_prob(x.clamp(-50, 50)).exp())
    mass = normal.cdf(edges[1:]) - normal.cdf(edges[:-1])
    cell_mean = (pdf(edges[:-1]) - pdf(edges[1:])) / mass
    torch.testing.assert_close(c, cell_mean, rtol=0, atol=1e-6)
    assert torch.equal(c, -c.flip(0)) or torch.allclose(c, -c.flip(0), atol=1e-9)
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu").to(DEVICE)
    mse = float(((x - c[torch.bucketize(x, edges[1:-1])]) ** 2).mean())
    assert mse == pytest.approx(0.009497, rel=0.01)


@pytest.mark.parametrize("d", [64, 128])
def test_randomized_hadamard_is_orthogonal(d):
    signs, h, rotation = kv.randomized_hadamard(d, 5, DEVICE)
    assert set(signs.tolist()) == {-1.0, 1.0} and set(h.float().unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(d), rtol=0, atol=1e-6)
    torch.testing.assert_close(rotation, signs[:, None] * h.float() / math.sqrt(d))
    assert not torch.equal(rotation, kv.randomized_hadamard(d, 6, DEVICE)[2])  # the seed picks the signs
    with pytest.raises(ValueError, match="power-of-two head_dim, not 96"):
        kv.randomized_hadamard(96, 5, DEVICE)


def test_tq4_distortion_holds_with_an_outlier_channel():
    """The rotation makes the error independent of the model's channels: relative MSE about the Gaussian
    Lloyd-Max figure (0.0095) for plain vectors and for vectors with a 30x outlier channel, where coding the
    unrotated coordinates with the same codebook costs far more."""
    cache = kv.make_kv_cache("tq4", 1, 1, 1, 8, 64, DEVICE, torch.float32)
    gen = torch.Generator().manual_seed(1)
    plain = torch.randn(4096, 64, generator=gen, device="cpu").to(DEVICE)
    outlier = plain.clone()
    outlier[:, 3] *= 30
    for x in (plain, outlier):
        y = cache.mse.decode_rotated(*cache.mse.encode(x)) @ cache.mse.rotation.T
        rel = float(((y - x) ** 2).sum() / (x ** 2).sum())
        assert 0.006 < rel < 0.013, rel
    unrotated = cache.mse.decode_rotated(*cache.mse.encode_rotated(outlier))  # the channels coded as they are
    assert float(((unrotated - outlier) ** 2).sum() / (outlier ** 2).sum()) > 0.05


@pytest.mark.parametrize("name", TRITON_BACKENDS)
def test_triton_append_accepts_broadcast_positions(name):
    """The decoder passes one device step counter expanded over the batch (stride 0)."""
    ref = kv.make_kv_cache(kv.TORCH_REFERENCE[name], 3, 2, 4, 64, 64, DEVICE, torch.float32, CFG)
    fast = kv.make_kv_cache(name, 3, 2, 4, 64, 64, DEVICE, torch.float32, CFG)
    step = torch.zeros(1, dtype=torch.int64)
    for _ in range(5):
        k, v = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
        ref.append(k, v, step.expand(3))
        fast.append(k, v, step.expand(3))
        step += 1
    q = torch.randn(3, 4, 64)
    torch.testing.assert_close(fast.attend(q), ref.attend(q), **FP16_DOT)


@pytest.mark.parametrize("name, g, d", [("bf16_triton", 2, 64), ("int8_triton", 2, 64), ("qjl_triton", 1, 64), ("int8_triton", 4, 128),
                                        ("qjl_triton", 4, 64), ("qjl_recentk_triton", 2, 64), ("tq4_triton", 1, 64),
                                        ("tq4_triton", 4, 128)])
@pytest.mark.parametrize("write_group", [1, 2, 3])
def test_fused_prologue_matches_reference(name, g, d, write_group):
    """One kernel splits a fused QKV row, RMS-norms and rotates q and k, scales q by its gain and quantize-writes
    k and v; a row at a negative position is inactive and leaves the cache untouched. Three KV heads a program
    (of three) put the keys' rows of the kernel's tile past padding after the query rows."""
    torch.manual_seed(4)
    hkv, b, cap = max(2, write_group), 3, 64
    ref = filled(kv.TORCH_REFERENCE[name], [5, 9, 3], hkv, g, d, cap)
    fast = kv.make_kv_cache(name, b, hkv, hkv * g, cap, d, DEVICE, torch.float32, CFG)
    fast.relaunch(write_settings=(write_group, 2))  # KV heads a program, warps
    for key in ref.buffers:
        fast.buffers[key].copy_(ref.buffers[key])
    fast.lengths.copy_(ref.lengths)
    before = {key: t.clone() for key, t in ref.buffers.items()}
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    q_gain = torch.rand(hkv * g) + 0.5
    positions = torch.tensor([5, -1, 70])  # row 1 inactive; row 2 wraps the ring
    qkv = torch.randn(b, (hkv * g + 2 * hkv) * d) * 3
    q_ref, q_fast = ref.prologue(qkv, positions, inv_freq, q_gain), fast.prologue(qkv, positions, inv_freq, q_gain)
    if isinstance(q_fast, kv.RotatedQuery):  # tq4 and qjl: the query in the layer's rotated basis
        torch.testing.assert_close(q_fast.values, fast.as_query(q_ref).values, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(q_fast, q_ref, rtol=1e-4, atol=1e-4)
    assert ref.lengths.tolist() == fast.lengths.tolist() == [6, 9, cap]
    for key in ref.buffers:
        assert torch.equal(ref.buffers[key][1], before[key][1]), key  # the inactive row is untouched
        if ref.buffers[key].is_floating_point():  # fp16 scales and norms, or exact K and V
            torch.testing.assert_close(fast.buffers[key], ref.buffers[key], rtol=1e-3, atol=1e-6)
        else:
            assert_same_codes(fast, ref, key, 1e-2)
    torch.testing.assert_close(fast.attend(q_fast), ref.attend(q_ref), **FP16_DOT)  # the query as the prologue made it
    q = torch.randn(b, hkv * g, d)
    torch.testing.assert_close(fast.attend(q), ref.attend(q), **FP16_DOT)


def kv_bench_on_cpu(monkeypatch, timer=lambda fn, **_: (fn(), 1.0)[1]):
    """benchmarks/benchmark_kv_backends.py run on this machine: fp32 caches under the interpreter, its CUDA timer
    replaced by `timer` (fn -> ms)."""
    bench = load_benchmark("benchmark_kv_backends", monkeypatch)
    monkeypatch.setattr(bench, "bench", timer)
    monkeypatch.setattr(bench, "DEVICE", DEVICE)
    monkeypatch.setattr(bench, "DTYPE", torch.float32)
    return bench


@pytest.mark.parametrize("name", ["int8_triton", "tq4_triton"])
def test_write_sweep_times_every_setting_against_the_reference(name, monkeypatch, capsys):
    """benchmark_kv_backends.py's write sweep (its timer stubbed: it needs CUDA): every (KV heads a program, warps)
    setting writes the query the torch reference does, and the cache is left on its default settings."""
    import argparse

    bench = kv_bench_on_cpu(monkeypatch)
    torch.manual_seed(7)
    a = argparse.Namespace(kv_heads=4, q_heads=8, head_dim=64)
    cache, ref = (kv.make_kv_cache(n, 2, 4, 8, 64, 64, DEVICE, torch.float32, CFG) for n in (name, kv.TORCH_REFERENCE[name]))
    rows = bench.sweep_write(name, cache, ref, a)
    assert [r["write_settings"] for r in rows] == [(h, w) for h in (1, 2, 4) for w in bench.WRITE_WARPS]
    assert max(r["max_abs_err_vs_torch"] for r in rows) < 1e-4
    assert cache.write_settings is None and "default" in capsys.readouterr().out


def test_sweep_runs_every_shape_and_keeps_its_rows(monkeypatch, tmp_path):
    """benchmark_kv_backends.py --sweep over two shapes (its timer stubbed, the CPU in fp32): each shape's attention
    settings and write settings are rows of the file, each checked against the torch reference, and each shape ranks
    its own attention rows (a ranking over every row raised KeyError on the write rows, which held no context)."""
    import argparse
    import json

    bench = kv_bench_on_cpu(monkeypatch)
    monkeypatch.setattr(bench, "GRIDS", {"int8": ((64,), (1,), (2,), (8,), (None,))})
    monkeypatch.setattr(bench, "WRITE_WARPS", (2,))
    a = argparse.Namespace(backends="int8_triton", shapes="64x2,32x1", kv_heads=4, q_heads=8, head_dim=64,
                           out=tmp_path / "kv_sweep.json")
    bench.sweep(a, CFG)
    rows = json.loads(a.out.read_text())
    assert [(r["context"], r["batch"], "settings" in r) for r in rows] == [
        (64, 2, True), (64, 2, False), (64, 2, False), (64, 2, False), (32, 1, True), (32, 1, False), (32, 1, False),
        (32, 1, False)]
    assert max(r["max_abs_err_vs_torch"] for r in rows) < 1e-4
    assert all((r["build"] is None) == (DEVICE == "cpu") for r in rows if "settings" in r)  # the GPU's build, if any


def test_kv_bench_rows_per_backend_and_shape(monkeypatch, tmp_path, capsys):
    """benchmark_kv_backends.py as device_run.sh's kv stage runs it, on the CPU (its timer, copy bandwidth and CUDA
    memory counters stubbed, fp32 under the interpreter): a row per backend and shape with the attention's and the
    KV write's us, the Triton backend's speedup over its torch reference, the copy bandwidth beside the rows."""
    import json
    import sys

    timed = []
    bench = kv_bench_on_cpu(monkeypatch, lambda fn, **_: (fn(), timed.append(1), 0.001 * len(timed))[2])
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 4176.0)
    for counter in ("is_available", "empty_cache", "memory_allocated", "reset_peak_memory_stats",
                    "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, counter, lambda *_, c=counter: c == "is_available" or 0)
    out = tmp_path / "kv_bench.json"
    monkeypatch.setattr(sys, "argv", ["benchmark_kv_backends.py", "--contexts", "32,48", "--batches", "2",
                                      "--backends", "int8,int8_triton", "--out", str(out)])
    bench.main()
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["copy_bandwidth_GB_s"] == 4176.0 and len(timed) == 8
    assert [(r["backend"], r["context"], r["batch"]) for r in rows] == [
        ("int8", 32, 2), ("int8_triton", 32, 2), ("int8", 48, 2), ("int8_triton", 48, 2)]
    assert [(r["us_per_attend"], r["us_per_write"]) for r in rows] == [(1.0, 2.0), (3.0, 4.0), (5.0, 6.0), (7.0, 8.0)]
    assert [r["speedup_vs_torch"] for r in rows] == [None, 1 / 3, None, 5 / 7]
    assert rows[0]["bytes_per_token"] == rows[1]["bytes_per_token"]
    assert [r["build"] is None for r in rows] == [True, DEVICE == "cpu"] * 2  # a Triton backend's GPU build, if any
    last = capsys.readouterr().out.splitlines()[-1].split()  # each row printed as it is measured
    assert last[:4] == ["int8_triton", "48", "2", "7.0"] and last[-1] == "8.0"


def test_rows_file_keeps_what_a_cut_run_measured(monkeypatch, tmp_path):
    """benchmarks/rows_file.py: the file holds every row measured so far, whole, when the run fails after some; a header
    goes beside the rows; a new run's file starts empty (no stale rows of an earlier run)."""
    import json

    rows_file = load_benchmark("rows_file", monkeypatch)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps([{"stale": True}]))

    def measured():
        yield {"backend": "int8_triton", "us": 1.0}
        yield {"backend": "tq4_triton", "us": 2.0}
        raise TimeoutError("the stage's deadline")

    out = rows_file.RowsFile(path)
    assert json.loads(path.read_text()) == []
    with pytest.raises(TimeoutError):
        out.extend(measured())
    assert json.loads(path.read_text()) == [{"backend": "int8_triton", "us": 1.0}, {"backend": "tq4_triton", "us": 2.0}]
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]
    with_header = rows_file.RowsFile(path, {"copy_bandwidth_GB_s": 4176.0})
    with_header.add({"us": 3.0})
    assert json.loads(path.read_text()) == {"copy_bandwidth_GB_s": 4176.0, "rows": [{"us": 3.0}]}


def test_compare_revs_puts_each_versions_figures_beside_the_first(tmp_path):
    """benchmarks/compare_revs.py on the files device_run.sh's stages write per version: each figure of the first
    version, the others' beside it with their ratio to it, '-' where a version lacks it; a version without runs is
    refused by name."""
    import json
    import subprocess
    import sys

    def runs(rev, attend, write, tok_s, step):
        folder = tmp_path / rev
        folder.mkdir()
        (folder / "kv_bench.json").write_text(json.dumps({"copy_bandwidth_GB_s": 4176.0, "rows": [
            {"backend": "tq4_triton", "context": 16384, "batch": 64, "us_per_attend": attend, "us_per_write": write}]}))
        (folder / "decode_bench.json").write_text(json.dumps([{"backend": "tq4_triton", "batch": 1024,
                                                               "full_cache_tok_s": tok_s}][:1 if tok_s else 0]))
        (folder / "profile_tq4_triton.json").write_text(json.dumps([
            {"backend": "tq4_triton", "batch": 1024, "kernel": "step", "us_per_step": step}]))

    runs("main", 160.0, 12.0, 595628.0, 1709.0)
    runs("next", 144.0, 6.0, None, 1624.0)
    compare = [sys.executable, str(ROOT / "benchmarks" / "compare_revs.py"), "--runs", str(tmp_path)]
    out = subprocess.run(compare + ["main", "next"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["attention us: main | next (ratio to main)",
                   f"  {'tq4_triton 16384 64':<56} 160.0 | 144.0 (0.900)",
                   "KV write us: main | next (ratio to main)",
                   f"  {'tq4_triton 16384 64':<56} 12.0 | 6.0 (0.500)",
                   "decode tok/s, full caches: main | next (ratio to main)",
                   f"  {'tq4_triton 1024':<56} 595,628.0 | -",
                   "decode profile us a step: main | next (ratio to main)",
                   f"  {'tq4_triton 1024 step':<56} 1,709.0 | 1,624.0 (0.950)"], out
    refused = subprocess.run(compare + ["main", "gone"], capture_output=True, text=True)
    assert refused.returncode != 0 and "no runs of gone" in refused.stderr


def test_device_run_skips_stages_past_its_deadline(tmp_path):
    """benchmarks/device_run.sh keeps its call within the device's limit: a stage runs while time is left, one with
    under 20 s left before the deadline is skipped, noted and fails the call, and REVS versions run by the
    caller's deadline (their own scripts, staged). A stage that reads no shards runs where none can be built."""
    import os
    import shutil
    import subprocess
    import sys

    root = tmp_path / "tree"
    for tree in (root, root / ".device" / "rev" / "a"):
        (tree / "benchmarks").mkdir(parents=True)
        for name in ("device_run.sh", "compare_revs.py"):
            shutil.copy(ROOT / "benchmarks" / name, tree / "benchmarks" / name)
    data = tmp_path / "data"
    data.mkdir()
    (data / "fineweb_val_000000.bin").write_bytes(b"")  # shards present: none built
    art = tmp_path / "final_model.int6.ptz"
    art.write_bytes(b"artifact")
    caller = {k: v for k, v in os.environ.items() if k != "DEADLINE"}  # run by device_run.sh itself: its deadline
    env = {**caller, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "DATA": str(data),
           "ART": str(art), "STAGES": "artifact"}

    def call(out, **settings):
        p = subprocess.run(["bash", str(root / "benchmarks" / "device_run.sh")], capture_output=True, text=True,
                           env={**env, "OUT": str(tmp_path / out), "RUNS": str(tmp_path / out / "runs"), **settings})
        return p.returncode, (tmp_path / out / "summary.txt").read_text()

    rc, summary = call("in_time", CALL_SECONDS="300")
    assert rc == 0 and "artifact final_model.int6.ptz: 8 bytes" in summary and "== artifact rc=0" in summary, summary
    rc, summary = call("late", CALL_SECONDS="19")
    assert rc == 1 and "== artifact skipped" in summary and "artifact final_model" not in summary, summary
    assert not (tmp_path / "late" / art.name).exists()
    rc, summary = call("revs_late", CALL_SECONDS="19", REVS="a")
    assert rc == 1 and "a: == artifact skipped" in summary, summary
    rc, summary = call("revs_in_time", CALL_SECONDS="300", REVS="a")
    assert rc == 0 and "a: == artifact rc=0" in summary, summary
    rc, summary = call("no_shards", CALL_SECONDS="300", DATA=str(tmp_path / "none"))  # no corpus either: none built
    assert rc == 0 and "== artifact rc=0" in summary and "build_shards" not in summary, summary


def test_kv_sensitivity_roundtrip_cache_is_tq4(monkeypatch):
    """benchmarks/kv_sensitivity.py decodes each entry at write: with keys and values coded it must attend as the
    tq4 reference does (to rounding) and count its bytes; a variant that codes another layer is the exact cache."""
    monkeypatch.setattr(kv, "KV_BACKENDS", dict(kv.KV_BACKENDS))  # the variants register there: undone after
    sens = load_benchmark("kv_sensitivity", monkeypatch)
    names = sens.variants(2, ["keys"], [4])
    assert names == ["tq4_kv", "tq4_keys", "tq4_values", "tq4_kv_recent4", "tq4_kv_recent4_keys", "tq4_keys_layer0",
                     "tq4_keys_layer1"]
    codes_alone = kv.KVConfig(recent_exact_tokens=0)  # the variants code every entry: tq4 without its exact ring
    make = lambda name, layer: kv.make_kv_cache(name, 2, 2, 4, 32, 64, DEVICE, torch.float32, codes_alone, layer)  # noqa: E731
    ref, coded, elsewhere, exact = make("tq4", 1), make("tq4_kv", 1), make("tq4_keys_layer0", 1), make("bf16", 1)
    for t in range(40):  # past the ring's 32 entries
        k, v = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
        for cache in (ref, coded, elsewhere, exact):
            cache.append(k, v, torch.tensor([t, t - 5]))
    q = torch.randn(2, 4, 64) * 3
    torch.testing.assert_close(coded.attend(q), ref.attend(q), rtol=0, atol=1e-5)
    assert (coded.attend(q) - exact.attend(q)).abs().max() > 1e-2
    torch.testing.assert_close(elsewhere.attend(q), exact.attend(q), rtol=0, atol=1e-6)
    assert coded.bytes_per_token() == ref.bytes_per_token() and elsewhere.bytes_per_token() == 2 * 2 * 64 * 2  # bf16
    ring = kv.KVConfig(recent_exact_tokens=4)  # tq4's own ring of 4 against the variant's
    ref_ring = kv.make_kv_cache("tq4", 2, 2, 4, 32, 64, DEVICE, torch.float32, ring, 1)
    coded_ring = kv.make_kv_cache("tq4_kv_recent4", 2, 2, 4, 32, 64, DEVICE, torch.float32, codes_alone, 1)
    coded = make("tq4_kv", 1)
    torch.manual_seed(6)
    for t in range(40):
        k, v = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
        for cache in (ref_ring, coded_ring, coded):
            cache.append(k, v, torch.tensor([t, t - 5]))
    torch.testing.assert_close(coded_ring.attend(q), ref_ring.attend(q), rtol=0, atol=1e-5)
    assert (coded_ring.attend(q) - coded.attend(q)).abs().max() > 1e-3  # the ring is in use
    assert coded_ring.bytes_per_token() == ref_ring.bytes_per_token()


def attend_sass(*args: str) -> dict[str, str]:
    """benchmarks/attend_sass.py's output line per backend, run with `args`."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attend_sass.py"), *args], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return {line.split()[0]: line for line in out.stdout.splitlines()}


def test_attend_sass_finds_the_loop_and_its_tensor_core_dots():
    """benchmarks/attend_sass.py builds the attention kernel for sm_90 without a GPU: the loop of a 64-entry block
    holds the tile's 32 m16n8k16 dots (scores 64x8x64, values two 32x8x64), spread over the launch's warps. Decoding
    int8 a word at a time keeps its loop within 1.25x of the exact cache's instructions per cached entry under triton
    3.8 (1.02x at two warps a program, 1.03x now that int8 takes one; code by code it took 1.69x). Other compilers
    lay the tiles out otherwise: triton 3.6 (the device's) gave 1.30x at two warps."""
    import triton

    lines = attend_sass("--backends", "int8_triton,bf16_triton", "--top", "40")
    per_entry = {name: float(line.split("(")[1].split()[0]) for name, line in lines.items()}
    warps = {name: int(line.split("block/warps/stages/regs ")[1].split("/")[1]) for name, line in lines.items()}
    hmma = {name: int(dict(op.split(":") for op in line.split("entry)")[1].split())["HMMA"]) * warps[name]
            for name, line in lines.items()}
    assert hmma == {"int8_triton": 32, "bf16_triton": 32}
    if kv.release(triton.__version__) >= (3, 8):
        assert per_entry["int8_triton"] <= 1.25 * per_entry["bf16_triton"], per_entry


def test_attend_sass_builds_a_launch_it_is_given():
    """--settings builds a launch other than the backend's: a register cap reaches the compiler (tq4 takes more than
    128 registers uncapped), and the SM holds as many one-warp programs as 128 registers a thread allow (16). A
    malformed launch is refused naming the form it takes."""
    lines = attend_sass("--backends", "tq4_triton", "--settings", "64/1/2/16/128")
    registers, programs = re.search(r"(\d+) registers, \d+ B shared, (\d+) programs an SM", lines["tq4_triton"]).groups()
    assert "64/1/2/128" in lines["tq4_triton"] and int(registers) <= 128 and int(programs) == 16, lines
    with pytest.raises(AssertionError, match="expected BLOCK/WARPS/STAGES/PROGRAMS/REGS"):
        attend_sass("--settings", "32/1/3")


def test_attend_sass_builds_the_write_kernel():
    """attend_sass.py --write builds the fused prologue's KV write kernel: tq4 rotates its one 16-row tile of query
    heads, keys and values by two fp16 tensor-core dots against H (16x64x64 in its one warp: 32 HMMA a dot);
    int8 rotates nothing."""
    lines = attend_sass("--backends", "tq4_triton,int8_triton", "--write", "--top", "60")
    mix = {name: dict(op.split(":") for op in line.split("per thread")[1].split()) for name, line in lines.items()}
    assert int(mix["tq4_triton"]["HMMA"]) == 64 and "HMMA" not in mix["int8_triton"], mix
