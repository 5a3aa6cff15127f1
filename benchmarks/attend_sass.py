"""The attention kernel's machine code for Hopper (sm_90), built on any machine, a GPU or not: per Triton backend
and launch regime, the instruction mix of the main loop (one BLOCK_N block of entries per iteration) per thread,
and all threads' instructions per cached entry, from the SASS that Triton's bundled ptxas and nvdisasm produce.
Instructions per entry bound a decoder that the memory does not: the tool to weigh a kernel change before
spending device time on it.

    python benchmarks/attend_sass.py --backends int8_triton,tq4_triton --regime bandwidth
    python benchmarks/attend_sass.py --backends int8_triton --rev 21e2068   # against a commit's triton_kv_ops.py
    python benchmarks/attend_sass.py --backends tq4_triton --write          # the KV write kernel instead
    python benchmarks/attend_sass.py --backends tq4_triton --settings 32/1/3/16/144   # a launch before sweeping it

The launch arguments are those the backend's attend passes (recorded from a call on the CPU), specialized as
Triton's JIT does (pointers 16-byte aligned, integers divisible by 16 marked so). Builds differ by Triton version (the
device's 3.6 gives tq4's bandwidth launch 159 registers, 3.9 145): for the device's, run it from a venv that has it,
`python -m venv --system-site-packages v36 && v36/bin/pip install triton==3.6.0`.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

os.environ["TRITON_INTERPRET"] = "0"  # compiled, not interpreted: set before triton is imported
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
                torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def load_kv_ops(rev: str | None):
    """triton_kv_ops as in the working tree, or as committed at `rev`."""
    path = ROOT / "triton_kv_ops.py"
    if rev:
        source = subprocess.run(["git", "show", f"{rev}:triton_kv_ops.py"], cwd=ROOT, capture_output=True, text=True)
        if source.returncode != 0:
            raise SystemExit(f"--rev {rev}: {source.stderr.strip()}")
        path = Path(tempfile.mkdtemp()) / "triton_kv_ops.py"
        path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location(f"triton_kv_ops_{rev or 'tree'}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` keeps the call instead of launching."""

    call = None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: setattr(self, "call", (args, kwargs))


def recorded_call(kv, kernel: str, launch):
    """(the kernel, the arguments `launch()` passes it): kv's kernel `kernel` records the call instead of running."""
    recorder, real = Recorder(), getattr(kv, kernel)
    setattr(kv, kernel, recorder)
    try:
        launch()
    finally:
        setattr(kv, kernel, real)
    return real, *recorder.call


def backend_cache(kv, name: str, batch: int, g: int, d: int, capacity: int):
    cls = {c.name: c for c in kv.TRITON_BACKENDS}[name]
    return cls(batch, 4, 4 * g, capacity, d, "cpu", torch.bfloat16, kv.KVConfig())


def attend_call(kv, name: str, regime: str, g: int, d: int, capacity: int, settings: tuple | None):
    """The attention kernel and the arguments `name`'s attend passes it in `regime` (1 row: latency; 64: bandwidth),
    at its launch settings or at `settings`."""
    batch = 64 if regime == "bandwidth" else 1
    cache = backend_cache(kv, name, batch, g, d, capacity)
    cache.relaunch(settings or cache.launch[regime])
    cache.lengths.fill_(capacity)
    q = torch.randn(batch, 4 * g, d, dtype=torch.bfloat16)
    return recorded_call(kv, "_attend_kernel", lambda: cache.attend(q))


def write_call(kv, name: str, regime: str, g: int, d: int, capacity: int, settings: tuple | None):
    """The KV write kernel and the arguments `name`'s fused prologue passes it in `regime` (1 row: latency; 1,024
    rows: bandwidth), at its write settings or at `settings`."""
    batch = 1024 if regime == "bandwidth" else 1
    cache = backend_cache(kv, name, batch, g, d, capacity)
    cache.relaunch(write_settings=settings)
    qkv = torch.randn(batch, (4 * g + 8) * d, dtype=torch.bfloat16)
    return recorded_call(kv, "_kv_write_kernel",
                         lambda: cache.prologue(qkv, torch.arange(batch), torch.rand(d // 2), torch.ones(4 * g)))


class Build(NamedTuple):
    sass: str
    registers: int  # a thread's
    shared: int  # bytes a program


def compile_sm90(fn, args, kwargs) -> Build:
    """The kernel built for sm_90 as the JIT would specialize these arguments: its SASS, registers and shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    signature, constexprs, attrs = {}, {}, {}
    for i, (n, param) in enumerate(zip(names, fn.params)):
        v = values[n]
        if param.is_constexpr:
            signature[n], constexprs[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[n], attrs[(i,)] = "*" + TRITON_TYPES[v.dtype], [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[n] = "fp32"
        elif v == 1:  # the JIT makes an integer argument equal to 1 a constant
            signature[n], constexprs[(i,)] = "constexpr", 1
        else:
            signature[n] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if kwargs.get(k) is not None}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options=options)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, check=True).stdout  # noqa: E731
        sass = run(str(tools / "nvdisasm"), "-c", f.name)
        usage = run(str(tools / "cuobjdump"), "--dump-resource-usage", f.name)
    return Build(sass, int(re.search(r"REG:(\d+)", usage).group(1)), kernel.metadata.shared)


def opcode_mix(lines: list[str]) -> collections.Counter:
    """Opcode counts of SASS lines, without modifiers or predicates."""
    mix = collections.Counter()
    for line in lines:
        m = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            mix[m.group(1)] += 1
    return mix


def loop_mix(sass: str) -> collections.Counter:
    """Opcode counts of the body of the kernel's longest backward branch: the loop."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    if not loops:
        raise SystemExit("no loop found in the kernel's SASS")
    start, end = max(loops, key=lambda se: se[1] - se[0])
    return opcode_mix(lines[start:end + 1])


def parse_settings(spec: str | None, write: bool) -> tuple | None:
    """'32/1/3/16/168' (attention: block, warps, stages, programs per SM, register cap or None) or '4/2' (write: KV
    heads a program, warps) -> the launch tuple a cache takes."""
    if spec is None:
        return None
    fields = spec.split("/")
    expected = 2 if write else 5
    if len(fields) != expected or not all(f.isdigit() or (f == "None" and i == 4) for i, f in enumerate(fields)):
        usage = ("HEADS/WARPS, e.g. 4/2" if write else
                 "BLOCK/WARPS/STAGES/PROGRAMS/REGS, e.g. 32/1/3/16/168 or 64/2/3/8/None")
        raise SystemExit(f"--settings {spec}: expected {usage}")
    return tuple(None if f == "None" else int(f) for f in fields)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="int8_triton", help="comma-separated Triton backends")
    p.add_argument("--regime", choices=("bandwidth", "latency"), default="bandwidth")
    p.add_argument("--group", type=int, default=2, help="query heads per KV head (the model's: 2)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--capacity", type=int, default=1024)
    p.add_argument("--rev", help="also build a commit's triton_kv_ops.py, beside the working tree's")
    p.add_argument("--top", type=int, default=12, help="opcodes listed per kernel")
    p.add_argument("--write", action="store_true", help="instead: the fused prologue's KV write kernel, all of it (it "
                   "has no loop; bandwidth: 1,024 rows, latency: 1)")
    p.add_argument("--settings", help="a launch to build instead of each backend's: BLOCK/WARPS/STAGES/PROGRAMS/REGS "
                   "(REGS a register cap or None), or with --write HEADS/WARPS")
    a = p.parse_args()
    settings, call = parse_settings(a.settings, a.write), write_call if a.write else attend_call
    tree = load_kv_ops(None)
    versions = [("tree", tree)] + ([(a.rev, load_kv_ops(a.rev))] if a.rev else [])
    for name in a.backends.split(","):
        for label, kv in versions:
            fn, args, kwargs = call(kv, name, a.regime, a.group, a.head_dim, a.capacity, settings)
            build, warps = compile_sm90(fn, args, kwargs), kwargs["num_warps"]
            mix = opcode_mix(build.sass.splitlines()) if a.write else loop_mix(build.sass)
            total, top = sum(mix.values()), " ".join(f"{op}:{n}" for op, n in mix.most_common(a.top))
            if a.write:
                print(f"{name:<20} {label:<8} {a.regime} write kernel, {warps} warps, {build.registers} registers: "
                      f"{total} instructions per thread  {top}", flush=True)
                continue
            launch = "/".join(str(kwargs.get(k)) for k in ("BLOCK_N", *LAUNCH_OPTIONS))
            per_entry = total * 32 * warps / kwargs["BLOCK_N"]  # comparable across launch settings
            held = tree.programs_an_sm(build.registers, build.shared, warps)
            print(f"{name:<20} {label:<8} {a.regime} block/warps/stages/regs {launch}: {build.registers} registers, "
                  f"{build.shared} B shared, {held} programs an SM; "
                  f"{total} instructions per thread per loop iteration ({per_entry:.0f} per cached entry)  {top}",
                  flush=True)

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
