"""Per KV backend: us per attention step as the decoder runs it (attend_in_basis: tq4's output stays in its rotated
basis, which the decoder folds into the output projection; attend would add a cast, a GEMM and a cast), achieved
GB/s (bytes the cache must read) against the measured copy bandwidth, bytes per token, peak CUDA memory over
baseline, speedup over the torch reference; and us per KV write as the decoder runs it (the fused prologue: a
token's QKV row normed, rotated and its K and V coded into the cache, every row active).
--sweep instead times the Triton backends' launch settings per shape, each checked against its torch reference,
and prints the fastest: the attention's (block, warps, stages, programs per SM, register cap), then the write
kernel's (KV heads a program, warps).

    python benchmarks/benchmark_kv_backends.py --out kv_bench.json
    python benchmarks/benchmark_kv_backends.py --sweep --shapes 1024x1,16384x64,1024x512
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton_kv_ops as kv  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows_file import RowsFile  # noqa: E402

DEVICE, DTYPE = "cuda", torch.bfloat16  # the decoder's (the CPU tests run the sweep in fp32 under the interpreter)


def copy_bandwidth() -> float:
    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() / ms / 1e6  # GB/s, bytes read + written


def bench(fn, reps=20, inner=25) -> float:
    """ms per call of fn, captured in a CUDA graph (launch gaps do not dominate): the median over `reps`
    timings of `inner` back-to-back replays, after ~50 ms of warm-up so the clocks are up."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.05:
        g.replay()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return sorted(times)[len(times) // 2]


def write_args(cache: kv.KVCache, a) -> tuple:
    """The fused prologue's arguments for one decode step: a random QKV row per batch row, at positions past the
    capacity (the cache stays full, as in the ring eval's steady state; rows write different slots)."""
    device = cache.device
    qkv = torch.randn(cache.batch, (a.q_heads + 2 * a.kv_heads) * a.head_dim, device=device, dtype=cache.dtype)
    positions = cache.capacity - 1 + torch.arange(cache.batch, device=device)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, a.head_dim, 2, device=device).float() / a.head_dim)
    return qkv, positions, inv_freq, torch.rand(a.q_heads, device=device) + 0.5


def random_cache(name: str, batch: int, ctx: int, a, cfg: kv.KVConfig) -> kv.KVCache:
    """A full cache of random codes and scales: never time on zeros."""
    cache = kv.make_kv_cache(name, batch, a.kv_heads, a.q_heads, ctx, a.head_dim, DEVICE, DTYPE, cfg)
    for buf in cache.buffers.values():
        buf.copy_(torch.randint(-100, 100, buf.shape, device=DEVICE).to(buf.dtype) if not buf.is_floating_point()
                  else torch.rand(buf.shape, device=DEVICE).to(buf.dtype) * 0.01 + 0.001)
    cache.lengths.fill_(ctx)
    return cache


# The sweep's launch settings per key codec: block_n, num_warps, num_stages, programs per SM, register cap (None:
# the compiler's choice). A codec not listed gets the widest grid.
WIDE_GRID = ((32, 64, 128, 256), (2, 4, 8), (1, 2, 3), (4, 8, 16), (None, 128))
GRIDS = {"exact": ((64, 128), (2, 4), (1, 2, 3), (4, 8), (None,)),
         "int8": ((64, 128), (1, 2, 4), (2, 3), (4, 8), (None, 128)),
         # tq4: values are read in whole tiles of 64 entries, so blocks of 64 (128 took 2,007 instructions a thread a
         # block at one warp, twice 64's, and 7 programs an SM). One warp a program builds to 168 registers uncapped
         # (12 programs an SM; a cap of 144 fits 13, shared memory then binds), two warps to 153; four would decode
         # each value tile twice (the dots' 32 channel rows over 4 warps: 970 instructions an entry), so the grid has
         # none. Before the tiles (561 instructions an entry at blocks of 32, one warp, 4 stages, against 463 now:
         # benchmarks/attend_sass.py, triton 3.6), 2 stages and caps of 128 never led a tq4 sweep.
         "tq4": ((64,), (1, 2), (3, 4, 5), (8, 16), (144, 168)),
         "qjl": ((32, 64, 128), (2, 4, 8), (1, 2, 3), (4, 8), (None, 128))}
WRITE_WARPS = (1, 2, 4, 8)
TRITON_NAMES = [cls.name for cls in kv.TRITON_BACKENDS]


def fastest(rows: list[dict], field: str, default, n: int) -> list[tuple[dict, str]]:
    """The n fastest rows, then the default settings' row, each with its tag for the sweep's printout."""
    ranked = sorted(rows, key=lambda r: r["us"])
    picked = ranked[:n] + [r for r in ranked if r[field] == default]
    return [(r, "default" if r[field] == default else "") for r in picked]


def built(report: dict | None) -> str:
    """A build report (TritonAttendMixin.build_report) as the sweep prints it."""
    if report is None:
        return "(no GPU build)"
    return (f"{report['registers']} registers, {report['spills']} spills, "
            f"{report['programs_an_sm']} programs an SM")


def sweep_write(name: str, cache: kv.KVCache, ref: kv.KVCache, a) -> list[dict]:
    """The write kernel's launch settings on `cache`: each timed on the prologue, its query checked against ref's."""
    args = write_args(cache, a)
    want = kv.query_tensor(cache.as_query(ref.prologue(*args))).float()
    rows = []
    for settings in itertools.product([h for h in range(1, a.kv_heads + 1) if a.kv_heads % h == 0], WRITE_WARPS):
        cache.relaunch(write_settings=settings)
        got = kv.query_tensor(cache.prologue(*args)).float()
        rows.append({"backend": name, "context": cache.capacity, "batch": cache.batch, "write_settings": settings,
                     "us": bench(lambda c=cache: c.prologue(*args), reps=5, inner=10) * 1000,
                     "max_abs_err_vs_torch": float((got - want).abs().max())})
    cache.relaunch()
    print(f"{name} B {cache.batch} write: fastest of {len(rows)} (KV heads a program/warps)")
    for r, tag in fastest(rows, "write_settings", cache.write_launch(), 3):
        print(f"  {'/'.join(map(str, r['write_settings'])):>12}  {r['us']:9.1f} us  "
              f"max|err| {r['max_abs_err_vs_torch']:.2e}  {tag}")
    return rows


def sweep(a, cfg: kv.KVConfig) -> None:
    out = RowsFile(a.out)
    for name in (n for n in a.backends.split(",") if n in TRITON_NAMES):
        for ctx, b in (map(int, shape.split("x")) for shape in a.shapes.split(",")):
            cache = random_cache(name, b, ctx, a, cfg)
            ref = kv.make_kv_cache(kv.TORCH_REFERENCE[name], b, a.kv_heads, a.q_heads, ctx, a.head_dim, DEVICE, DTYPE,
                                   cfg)
            for key, buf in cache.buffers.items():
                ref.buffers[key].copy_(buf)
            ref.lengths.copy_(cache.lengths)
            q = torch.randn(b, a.q_heads, a.head_dim, device=DEVICE, dtype=DTYPE)
            want = ref.attend(q).float()
            q = cache.as_query(q)  # as the decoder's prologue hands it over
            moved = b * ctx * cache.bytes_per_token()
            default = cache.launch_settings()
            grid, shape_rows = GRIDS.get(cache.key_codec, WIDE_GRID), []
            for settings in itertools.product(*grid):
                cache.relaunch(settings)
                try:
                    got = cache.attend(q).float()
                    us = bench(lambda c=cache, x=q: c.attend_in_basis(x), reps=5, inner=10) * 1000
                except Exception as e:  # a setting the compiler refuses (shared memory, registers) is reported
                    print(f"{name} ctx {ctx} B {b} {settings}: {type(e).__name__}")
                    continue
                shape_rows.append({"backend": name, "context": ctx, "batch": b, "settings": settings,
                                   "splits": cache.splits, "us": us, "GB_s": moved / us / 1e3,
                                   "max_abs_err_vs_torch": float((got - want).abs().max()),
                                   "build": cache.build_report()})
                out.add(shape_rows[-1])
            print(f"{name} ctx {ctx} B {b}: fastest of {len(shape_rows)} (block_n/warps/stages/programs per SM/register "
                  "cap -> splits)")
            for r, tag in fastest(shape_rows, "settings", default, 5):
                print(f"  {'/'.join(map(str, r['settings'])):>12} -> {r['splits']:>3}  {r['us']:9.1f} us  "
                      f"{r['GB_s']:7.0f} GB/s  max|err| {r['max_abs_err_vs_torch']:.2e}  {built(r['build'])}  {tag}")
            out.add(*sweep_write(name, cache, ref, a))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", default="256,1024,4096,16384")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--backends", default=",".join(kv.KV_BACKENDS), help="comma-separated; default: every backend")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--q-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--sweep", action="store_true", help="time the Triton launch settings instead")
    p.add_argument("--shapes", default="1024x1,16384x64,1024x512", help="--sweep: context x batch")
    p.add_argument("--out", type=Path, default=Path("kv_bench.json"))
    a = p.parse_args()
    if not torch.cuda.is_available():
        p.error("times CUDA kernels and graphs: run it on a GPU machine (benchmarks/device_run.sh)")
    cfg = kv.KVConfig(group_size=32, value_bits=4)
    if a.sweep:
        return sweep(a, cfg)
    bw = copy_bandwidth()
    print(f"measured copy bandwidth: {bw:.0f} GB/s")
    out = RowsFile(a.out, {"copy_bandwidth_GB_s": bw})
    print(f"{'backend':<12}{'ctx':>7}{'B':>5}{'us':>10}{'GB/s':>9}{'%bw':>6}{'B/tok':>7}{'peak+MiB':>10}{'x torch':>9}"
          f"{'write us':>10}")
    for ctx in map(int, a.contexts.split(",")):
        for b in map(int, a.batches.split(",")):
            ref_us = {}
            for name in a.backends.split(","):
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                cache = random_cache(name, b, ctx, a, cfg)
                q = cache.as_query(torch.randn(b, a.q_heads, a.head_dim, device=DEVICE, dtype=DTYPE))
                cache.prewarm()
                cache.lengths.fill_(ctx)
                held = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                ms = bench(lambda c=cache, x=q: c.attend_in_basis(x))
                peak = torch.cuda.max_memory_allocated() - held
                us = ms * 1000
                write_us = bench(lambda c=cache, w=write_args(cache, a): c.prologue(*w)) * 1000
                ref_us[name] = us
                moved = b * ctx * cache.bytes_per_token()
                ref = kv.TORCH_REFERENCE.get(name)
                r = {"backend": name, "context": ctx, "batch": b, "us_per_attend": us, "GB_s": moved / ms / 1e6,
                     "frac_of_copy_bw": moved / ms / 1e6 / bw, "bytes_per_token": cache.bytes_per_token(),
                     "peak_over_baseline_mib": peak / 2**20, "cache_mib": (held - base) / 2**20,
                     "speedup_vs_torch": ref_us[ref] / us if ref in ref_us else None, "us_per_write": write_us,
                     "build": cache.build_report() if name in TRITON_NAMES else None}
                out.add(r)
                sp = f"{r['speedup_vs_torch']:.1f}" if r["speedup_vs_torch"] else "-"
                print(f"{name:<12}{ctx:>7}{b:>5}{us:>10.1f}{r['GB_s']:>9.0f}{100 * r['frac_of_copy_bw']:>6.1f}"
                      f"{r['bytes_per_token']:>7}{r['peak_over_baseline_mib']:>10.1f}{sp:>9}{write_us:>10.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
