"""Parameter-golf trainer: a small GPT trained with Polar STE QAT, exported as polar+zlib,
rescored from the artifact on every rank, then decoded autoregressively through a
quantized KV cache (triton_kv_ops.py) on rank 0.

Sections, in reading order: hyperparameters, distributed + logging, data, quantization
(int8, int-k and polar codecs, artifact), model, Muon, teacher-forced evaluation, main(). The
autoregressive eval (token plans, the decoder, the final AR evals) lives beside the caches it
drives, in triton_kv_ops.py.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import hashlib
import io
import json
import lzma
import math
import os
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before any process group: see leave_process_group
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

import triton_kv_ops as kv

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines without triton still train (torch codec path).
    triton = None

PROCESS_START = time.perf_counter()
CODE_FILES = (Path(__file__).resolve(), Path(kv.__file__).resolve())

# -----------------------------------------------------------------------------
# Hyperparameters: every field is read from the env var of the same name, upper-cased.
# -----------------------------------------------------------------------------


@dataclass
class Hyperparameters:
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    run_id: str = ""
    seed: int = 1337
    out_dir: str = "."
    # Validation cadence; VAL_MAX_TOKENS>0 scores only a prefix (smoke runs only).
    val_batch_size: int = 524_288
    val_loss_every: int = 1000
    val_max_tokens: int = 0
    train_log_every: int = 200
    # Training length and the wallclock promise.
    iterations: int = 20000
    warmdown_iters: int = 1200
    warmup_steps: int = 20
    train_batch_tokens: int = 524_288
    train_seq_len: int = 1024
    grad_accum_steps: int = 0  # 0: 8 // WORLD_SIZE, as the challenge's 8-GPU batch split
    max_wallclock_seconds: float = 600.0
    strict_wallclock: bool = False  # count the budget from process start (setup + compile too)
    compile: str = "auto"  # auto: on for CUDA, off for CPU
    # Model shape.
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    # Optimizers (the baseline's values).
    embed_lr: float = 0.6
    head_lr: float = 0.008
    tied_embed_lr: float = 0.05
    tied_embed_init_std: float = 0.005
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    muon_momentum: float = 0.95
    muon_backend_steps: int = 5
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.0
    # Weight quantization: QAT in training, the same codec at export.
    qat_scheme: str = "none"  # none | int8 | int | polar
    qat_start_frac: float = 0.5
    weight_quant_scheme: str = "int8"  # int8 (the baseline's) | int (INT_BITS per row) | polar
    int_bits: int = 6
    int_embed_bits: int = 8
    int_rotate: bool = False  # int: code each row after a seeded randomized Hadamard rotation
    polar_bits: str = "4,3,3,3,4"
    polar_embed_bits: str = "5,4,4,4,5"
    polar_kind_bits: str = ""  # polar bits of some matrix kinds, e.g. attn.c_v=5,4,4,4,5/attn.c_q=3,3,3,3,3
    quant_seed: int = 20240520  # the rotations' seed
    compressor: str = "zlib"  # zlib | lzma
    codec_compare: str = ""  # space-separated codec specs (see CodecSettings.spec) to export and rescore the same weights with
    # Final autoregressive eval through the KV cache (rank 0).
    kv_quant_backend: str = "auto"  # auto: int8_triton on CUDA, int8 elsewhere
    kv_eval_compare_backends: str = ""
    kv_eval_max_tokens: int = 0  # the scored AR eval's targets; 0: the whole validation split
    kv_eval_compare_tokens: int = 262_144  # the exact reference, windows check and comparisons: a prefix of those
    kv_eval_batch: int = 1024  # rows decoded at once; the scored eval cuts the split into this many spans
    kv_eval_context_len: int = 0  # the ring cache's entries C; 0: TRAIN_SEQ_LEN
    eval_stride: int = 0  # >0: the teacher-forced sliding-window reference at this stride (the leaderboard's 64)
    kv_eval_cuda_graph: bool = True
    kv_group_size: int = 32
    kv_qjl_dim: int = 32
    kv_value_bits: int = 4
    kv_recent_exact_tokens: str = "auto"  # newest entries kept exact: auto (tq4 8, qjl_recentk 6) or a count
    kv_seed: int = 0

    CHOICES = {"compile": ("auto", "0", "1"), "qat_scheme": ("none", "int8", "int", "polar"),
               "weight_quant_scheme": ("int8", "int", "polar"), "compressor": ("zlib", "lzma")}

    @classmethod
    def from_env(cls, env=os.environ) -> "Hyperparameters":
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.name.upper())
            if raw is None:
                continue
            try:
                values[f.name] = _parse_env_value(raw, f.type)
            except ValueError:
                raise ValueError(f"{f.name.upper()}={raw!r} is not a valid {f.type}; default is {f.default!r}") from None
        args = cls(**values)
        args.validate()
        return args

    def validate(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name.upper()}={getattr(self, name)!r}: {what}")

        for name, choices in self.CHOICES.items():
            need(getattr(self, name) in choices, name, f"must be one of {', '.join(choices)}")
        for name in ("iterations", "train_batch_tokens", "train_seq_len", "vocab_size", "num_layers", "model_dim",
                     "num_heads", "num_kv_heads", "mlp_mult", "val_batch_size", "kv_eval_batch", "kv_group_size",
                     "muon_backend_steps"):
            need(getattr(self, name) > 0, name, "must be positive")
        for name in ("warmup_steps", "warmdown_iters", "val_loss_every", "train_log_every", "val_max_tokens",
                     "grad_accum_steps", "kv_eval_max_tokens", "kv_eval_compare_tokens", "kv_eval_context_len",
                     "eval_stride", "muon_momentum_warmup_steps"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.max_wallclock_seconds >= 0, "max_wallclock_seconds", "must be >= 0 (0 disables the cap)")
        need(0.0 <= self.qat_start_frac <= 1.0, "qat_start_frac", "must be in [0, 1]")
        need(self.model_dim % self.num_heads == 0, "num_heads", f"must divide MODEL_DIM={self.model_dim}")
        need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", f"must divide NUM_HEADS={self.num_heads}")
        need((self.model_dim // self.num_heads) % 2 == 0, "num_heads",
             f"MODEL_DIM={self.model_dim} / NUM_HEADS must be an even head_dim for RoPE")
        need(self.logit_softcap > 0, "logit_softcap", "must be positive")
        need(self.kv_recent_exact_tokens == "auto" or self.kv_recent_exact_tokens.isdigit(), "kv_recent_exact_tokens",
             "must be auto (each backend's own ring) or a count >= 0 (0: none)")
        need((self.model_dim // self.num_heads) % self.kv_group_size == 0, "kv_group_size", "must divide head_dim")
        for name in ("int_bits", "int_embed_bits"):
            need(2 <= getattr(self, name) <= 8, name, "must be in 2..8")
        for name, parse in (("polar_bits", parse_polar_bits), ("polar_embed_bits", parse_polar_bits),
                            ("polar_kind_bits", parse_kind_bits),
                            ("codec_compare", lambda specs: [CodecSettings.parse(c, self.quant_seed) for c in specs.split()])):
            try:
                parse(getattr(self, name))
            except ValueError as e:
                need(False, name, str(e))
        self.ar_eval_settings()  # the KV cache's settings and backends check themselves (triton_kv_ops)

    def check_runs_on(self, device: torch.device) -> None:
        """Resolves KV_QUANT_BACKEND=auto for the device; refuses, before any training, one that cannot run there."""
        self.kv_quant_backend = self.ar_eval_settings().for_device(device).backend

    train_files = property(lambda self: os.path.join(self.data_path, "fineweb_train_*.bin"))
    val_files = property(lambda self: os.path.join(self.data_path, "fineweb_val_*.bin"))

    def ar_eval_settings(self) -> "kv.AREvalSettings":
        """The AR evals' settings, checked there (after check_runs_on, which resolves KV_QUANT_BACKEND=auto); a KV
        quantizer group never spans more than one head."""
        cache = kv.KVConfig(group_size=min(self.kv_group_size, self.model_dim // self.num_heads),
                            qjl_dim=self.kv_qjl_dim, value_bits=self.kv_value_bits,
                            recent_exact_tokens=None if self.kv_recent_exact_tokens == "auto"
                            else int(self.kv_recent_exact_tokens), seed=self.kv_seed)
        return kv.AREvalSettings(self.kv_quant_backend, tuple(b for b in self.kv_eval_compare_backends.split(",") if b),
                                 self.kv_eval_batch, self.kv_eval_context_len or self.train_seq_len, self.train_seq_len,
                                 self.kv_eval_cuda_graph, cache, self.kv_eval_max_tokens, self.kv_eval_compare_tokens)

    def codec_settings(self, scheme: str) -> "CodecSettings":
        """The weight codec's settings for `scheme` (QAT_SCHEME or WEIGHT_QUANT_SCHEME)."""
        if scheme == "int":
            return CodecSettings("int", (self.int_bits,), (self.int_embed_bits,), self.int_rotate, self.quant_seed)
        if scheme == "polar":
            return CodecSettings("polar", parse_polar_bits(self.polar_bits), parse_polar_bits(self.polar_embed_bits),
                                 True, self.quant_seed, parse_kind_bits(self.polar_kind_bits))
        return CodecSettings(scheme)

    def model_config(self) -> dict:
        keys = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "tie_embeddings",
                "rope_base", "logit_softcap", "qk_gain_init", "tied_embed_init_std")
        return {k: getattr(self, k) for k in keys}


def _parse_env_value(raw: str, kind: str):
    flag = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(raw.strip().lower())
    if kind == "bool" and flag is None:
        raise ValueError(raw)
    return flag if kind == "bool" else {"int": int, "float": float, "str": str}[kind](raw)


def parse_polar_bits(spec: str) -> tuple[int, ...]:
    """'4,3,3,2' -> (4, 3, 3, 2); ValueError unless one or more bit counts in 1..8."""
    bits = tuple(int(b) if b.strip().isdigit() else 0 for b in spec.split(",") if b.strip())
    if not bits or not all(1 <= b <= 8 for b in bits):
        raise ValueError("must be comma-separated bits in 1..8, e.g. 4,3,3,2")
    return bits


MATRIX_KINDS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")  # each block's matrices


def parse_kind_bits(spec: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """'attn.c_v=5,4,4,4,5/attn.c_q=3,3,3,3,3' -> ((kind, polar bits), ...), each kind once; '' -> ()."""
    out: dict[str, tuple[int, ...]] = {}
    for item in filter(None, spec.split("/")):
        kind, _, bits = item.partition("=")
        if kind in out:
            raise ValueError(f"{spec!r} names a matrix kind twice")
        try:
            out[kind] = parse_polar_bits(bits if kind in MATRIX_KINDS else "")
        except ValueError:
            raise ValueError(f"{item!r}: expected KIND=BITS, KIND one of {', '.join(MATRIX_KINDS)}, BITS comma-separated "
                             f"in 1..8 (e.g. attn.c_v=5,4,4,4,5)") from None
    return tuple(out.items())


# -----------------------------------------------------------------------------
# Distributed + logging
# -----------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    store: dist.Store | None = None  # the launcher's key-value store: it outlives the process group
    enabled = property(lambda self: self.world_size > 1)
    master = property(lambda self: self.rank == 0)


def init_distributed() -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return Dist(rank, world_size, local_rank, device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return Dist(rank, world_size, local_rank, device, dist.distributed_c10d._get_default_store())


def leave_process_group(d: Dist) -> None:
    """Every rank leaves the group before rank 0's evals (CUDA graphs, captured with no NCCL group live). The caller
    drops its DDP wrapper first, so the group's threads join here, not at exit, where a gloo worker freeing tensors
    takes the GIL and aborts. torch.distributed.nn holds the group (in default arguments) unless imported first."""
    if d.enabled:
        dist.barrier()
        dist.destroy_process_group()


def end_run(d: Dist) -> None:
    """Rank 0 says it is done; the other ranks wait for that to exit, so no failure at their exit makes torchrun stop
    rank 0's evals (torchrun stops every rank when one fails, and the waiting ones if rank 0 does)."""
    if d.enabled and d.master:
        d.store.set("rank0_done", "1")
    elif d.enabled:
        d.store.wait(["rank0_done"], timedelta(days=1))


def ranks_max(d: Dist, *values: int) -> list[int]:
    """Each value's maximum over the ranks: a flag any rank raises (the wallclock stop), or -x and x for x's range."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


class RunLog:
    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(msg, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            print(msg, file=f)

    def header(self) -> None:
        for path in CODE_FILES:
            self(f"==> {path.name} <==\n{path.read_text(encoding='utf-8')}", console=False)
        self("=" * 100, console=False)
        versions = f"python {sys.version.split()[0]} torch {torch.__version__} numpy {np.__version__}"
        versions += f" sentencepiece {spm.__version__} triton {getattr(triton, '__version__', 'absent')}"
        self(f"versions: {versions}")
        if torch.cuda.is_available():
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False).stdout
            self(smi, console=False)


# -----------------------------------------------------------------------------
# Data: challenge shards (256 x int32 header, then uint16 tokens) and byte accounting
# -----------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 256 * 4
SHARD_FIX = "delete it and re-run data/cached_challenge_fineweb.py (FineWeb) or data/build_shards.py (local text)"


def read_shard(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise ValueError(f"shard {path} has {size} bytes, less than its {SHARD_HEADER_BYTES}-byte header "
                         f"(empty or truncated download): {SHARD_FIX}")
    header = np.fromfile(path, dtype="<i4", count=256)
    if int(header[0]) != SHARD_MAGIC:
        raise ValueError(f"shard {path} has magic {int(header[0])}, expected {SHARD_MAGIC}: "
                         f"not a challenge shard; {SHARD_FIX}")
    if int(header[1]) != SHARD_VERSION:
        raise ValueError(f"shard {path} has version {int(header[1])}, this code reads {SHARD_VERSION}: {SHARD_FIX}")
    n = int(header[2])
    if size != SHARD_HEADER_BYTES + 2 * n:
        raise ValueError(f"shard {path} is {size} bytes but its header promises {n} tokens "
                         f"({SHARD_HEADER_BYTES + 2 * n} bytes): truncated or corrupt; {SHARD_FIX}")
    return np.fromfile(path, dtype="<u2", count=n, offset=SHARD_HEADER_BYTES)


def shard_paths(pattern: str) -> list[Path]:
    files = [Path(p) for p in sorted(glob.glob(pattern))]
    if not files:
        raise FileNotFoundError(f"no shards match {pattern}: download FineWeb with data/cached_challenge_fineweb.py "
                                f"or build shards from text with data/build_shards.py, then set DATA_PATH")
    return files


class TokenStream:
    """Reads the shards in order, forever; every rank reads the same stream."""

    def __init__(self, pattern: str):
        self.files, self.index, self.pos = shard_paths(pattern), 0, 0
        self.tokens = read_shard(self.files[0])

    def take(self, n: int) -> np.ndarray:
        chunks = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.index = (self.index + 1) % len(self.files)
                self.tokens, self.pos = read_shard(self.files[self.index]), 0
            k = min(n, len(self.tokens) - self.pos)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(chunks)


class DistributedTokenLoader:
    """Each micro-step takes world_size consecutive spans of the stream, one per rank, so a
    run sees the same tokens in the same order at any world size for one global batch."""

    def __init__(self, pattern: str, d: Dist):
        self.stream, self.d = TokenStream(pattern), d

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        span = local_tokens + 1
        chunk = self.stream.take(span * self.d.world_size)[self.d.rank * span:(self.d.rank + 1) * span]
        local = torch.from_numpy(chunk.astype(np.int64))
        x, y = local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)
        return x.to(self.d.device, non_blocking=True), y.to(self.d.device, non_blocking=True)


def load_validation_tokens(args: Hyperparameters) -> Tensor:
    tokens = np.concatenate([read_shard(p) for p in shard_paths(args.val_files)])
    if args.val_max_tokens > 0:
        tokens = tokens[:args.val_max_tokens + 1]
    usable = ((len(tokens) - 1) // args.train_seq_len) * args.train_seq_len
    if usable <= 0:
        raise ValueError(f"validation split has {len(tokens)} tokens, too few for TRAIN_SEQ_LEN={args.train_seq_len}")
    if int(tokens.max()) >= args.vocab_size:
        raise ValueError(f"validation shards hold token id {int(tokens.max())} >= VOCAB_SIZE={args.vocab_size}: "
                         f"the shards were made with another tokenizer; rebuild them with {args.tokenizer_path}")
    return torch.from_numpy(tokens[:usable + 1].astype(np.int64))


def load_tokenizer(args: Hyperparameters) -> spm.SentencePieceProcessor:
    if not Path(args.tokenizer_path).is_file():
        raise FileNotFoundError(f"tokenizer {args.tokenizer_path} not found: set TOKENIZER_PATH")
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer_path)
    if sp.vocab_size() != args.vocab_size:
        raise ValueError(f"VOCAB_SIZE={args.vocab_size} but tokenizer {args.tokenizer_path} has {sp.vocab_size()} "
                         f"pieces: set VOCAB_SIZE to match or use the tokenizer the shards were built with")
    return sp


@dataclass
class ByteLUTs:
    base_bytes: Tensor
    leading_space: Tensor
    is_boundary: Tensor

    @classmethod
    def build(cls, sp: spm.SentencePieceProcessor, device: torch.device) -> "ByteLUTs":
        n = sp.vocab_size()
        base, space, boundary = np.zeros(n, np.int16), np.zeros(n, np.bool_), np.ones(n, np.bool_)
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            boundary[i] = False
            if sp.is_byte(i):
                base[i] = 1
                continue
            piece = sp.id_to_piece(i)
            if piece.startswith("\u2581"):
                space[i], piece = True, piece[1:]
            base[i] = len(piece.encode("utf-8"))
        return cls(*(torch.tensor(a, device=device) for a in (base, space, boundary)))

    def count(self, prev: Tensor, tgt: Tensor) -> Tensor:
        """UTF-8 bytes of each target token; its leading space counts unless the previous token is a boundary."""
        return self.base_bytes[tgt].to(torch.int64) + (self.leading_space[tgt] & ~self.is_boundary[prev]).to(torch.int64)


# -----------------------------------------------------------------------------
# Quantization: int8, int-k and polar row codecs (encode / decode / fake_quant) and the artifact
# -----------------------------------------------------------------------------

CONTROL_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")
KEEP_FLOAT_MAX_NUMEL = 65_536


def is_quantized_tensor(name: str, t: Tensor) -> bool:
    return t.is_floating_point() and t.ndim == 2 and t.numel() > KEEP_FLOAT_MAX_NUMEL


def padded_width(cols: int) -> int:
    return 1 << max(cols - 1, 1).bit_length()


@lru_cache(maxsize=None)
def rotation_signs(seed: int, d: int, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(seed + d)
    return (torch.randint(0, 2, (d,), generator=gen).float() * 2 - 1).to(device)


def hadamard_rotate(w: Tensor, signs: Tensor) -> Tensor:
    """Rows zero-padded to d = len(signs), sign-flipped, then the orthonormal Hadamard transform: x = H D w."""
    d = signs.numel()
    return kv.fwht(F.pad(w.float(), (0, d - w.shape[1])) * signs) / math.sqrt(d)


def hadamard_unrotate(x: Tensor, signs: Tensor, cols: int) -> Tensor:
    return (kv.fwht(x) / math.sqrt(signs.numel()) * signs)[:, :cols]


class IntRowCodec:
    """Symmetric k-bit codes (k = 2..8) with one fp16 absmax scale per row, optionally of the row after a
    seeded randomized Hadamard rotation (which spreads outliers, so the absmax scale wastes fewer levels).
    Codes of 4 bits or fewer are bit-packed; wider ones take a byte each, which the compressor then
    squeezes toward their entropy (measured on trained-like rows: int6 as bytes 4.4 bits/weight with
    lzma, bit-packed 5.1)."""

    def __init__(self, bits: int, rotate: bool, seed: int, min_scale: float = 2.0 ** -24):  # the least fp16 above 0
        self.bits, self.rotate, self.seed, self.min_scale = bits, rotate, seed, min_scale
        self.qmax = 2 ** (bits - 1) - 1

    def _signs(self, cols: int, device: torch.device) -> Tensor:
        return rotation_signs(self.seed, padded_width(cols), device)

    def quantize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """-> (codes int8 in [-qmax, qmax] (rows, width), scale fp16 (rows,)); width is padded_width if rotated."""
        x = hadamard_rotate(w, self._signs(w.shape[1], w.device)) if self.rotate else w.float()
        scale = (x.abs().amax(dim=1) / self.qmax).clamp_min(self.min_scale).half()
        return torch.clamp(torch.round(x / scale.float()[:, None]), -self.qmax, self.qmax).to(torch.int8), scale

    def dequantize(self, q: Tensor, scale: Tensor, cols: int) -> Tensor:
        x = q.float() * scale.float()[:, None]
        return hadamard_unrotate(x, self._signs(cols, x.device), cols) if self.rotate else x

    def encode(self, w: Tensor) -> dict:
        q, scale = self.quantize(w)
        if self.bits <= 4:
            return {"packed": pack_bits((q.cpu().to(torch.int16) + self.qmax).to(torch.uint8), self.bits),
                    "scale": scale.cpu()}
        return {"q": q.cpu(), "scale": scale.cpu()}

    def decode(self, enc: dict, shape: tuple[int, ...]) -> Tensor:
        rows, cols = shape
        width = padded_width(cols) if self.rotate else cols
        q = (enc["q"] if "q" in enc else
             (unpack_bits(enc["packed"], self.bits, rows * width).to(torch.int16) - self.qmax).reshape(rows, width))
        return self.dequantize(q, enc["scale"], cols)

    @torch.no_grad()
    def fake_quant_(self, w: Tensor, out: Tensor) -> None:
        q, scale = self.quantize(w)
        out.copy_(self.dequantize(q, scale, w.shape[1]) - w)


class Int8RowCodec(IntRowCodec):
    """The baseline's scheme: symmetric int8 codes, one fp16 absmax scale per row and none below 1/127."""

    def __init__(self):
        super().__init__(8, rotate=False, seed=0, min_scale=1.0 / 127.0)


@lru_cache(maxsize=None)
def angle_codebook(level: int, bits: int) -> np.ndarray:
    """Lloyd-Max centroids for the level's angle. Level 0 pairs two rotated (near-Gaussian)
    coordinates: the angle is uniform on (-pi, pi]. Level l >= 1 pairs the norms of two 2^l-dim
    Gaussian vectors: sin^2 of the angle is Beta(2^(l-1), 2^(l-1)), a density sin(2t)^(2^l - 1)
    on [0, pi/2] that narrows around pi/4 level by level."""
    count = 2 ** bits
    if level == 0:
        return (-math.pi + (np.arange(count) + 0.5) * 2 * math.pi / count).astype(np.float64)
    k = 2 ** level
    grid = np.linspace(0, math.pi / 2, 20001)[1:-1]
    logp = (k - 1) * np.log(np.sin(2 * grid))
    p = np.exp(logp - logp.max())
    cdf = np.cumsum(p) / p.sum()
    cents = np.interp((np.arange(count) + 0.5) / count, cdf, grid)
    for _ in range(300):
        edges = np.concatenate(([0.0], (cents[1:] + cents[:-1]) / 2, [math.pi / 2]))
        cell = np.clip(np.searchsorted(edges, grid) - 1, 0, count - 1)
        mass = np.bincount(cell, weights=p, minlength=count)
        moment = np.bincount(cell, weights=p * grid, minlength=count)
        cents = np.where(mass > 0, moment / np.maximum(mass, 1e-300), cents)
    return cents


def uniform_codebook(level: int, bits: int) -> np.ndarray:
    """The first public attempt's grid: uniform over each level's angle range (for comparison)."""
    count = 2 ** bits
    lo, hi = (-math.pi, math.pi) if level == 0 else (0.0, math.pi / 2)
    return lo + (np.arange(count) + 0.5) * (hi - lo) / count


class PolarRowCodec:
    """Rows padded to d = 2^L, rotated by a seeded randomized Hadamard transform, then turned into
    polar form level by level: pairs -> (radius, angle), radii paired again, leaving one fp16
    radius per row and d-1 angles. Angles of level l take bits[l] bits (the last entry repeats)
    from that level's Lloyd-Max codebook; codes are bit-packed."""

    def __init__(self, bits: tuple[int, ...], seed: int, codebook=angle_codebook, rotate: bool = True):
        self.bits, self.seed, self.codebook, self.rotate = tuple(bits), seed, codebook, rotate

    def level_bits(self, levels: int) -> list[int]:
        return [self.bits[min(i, len(self.bits) - 1)] for i in range(levels)]

    def tables(self, d: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(signs[d], cos[L, K], sin[L, K], codes_per_level[L]); short levels repeat their last centroid."""
        return polar_tables(tuple(self.level_bits(d.bit_length() - 1)), self.seed, d, device, self.codebook, self.rotate)

    def bits_per_weight(self, rows: int, cols: int) -> float:
        d = padded_width(cols)
        levels = d.bit_length() - 1
        angle_bits = sum(b * (d >> (i + 1)) for i, b in enumerate(self.level_bits(levels)))
        return rows * (angle_bits + 16) / (rows * cols)

    def fused(self, w: Tensor) -> bool:
        """Where the fused Triton kernel encodes (CUDA, rows of 256+ columns). QAT and export both dispatch
        here, so on every device training sees exactly the codes the artifact stores: the kernel and the
        torch reference can pick different codes at near-ties, as their rotations round differently."""
        return w.is_cuda and triton is not None and w.shape[1] >= 256

    def encode_codes(self, w: Tensor) -> tuple[list[Tensor], Tensor]:
        """-> (codes of each level (rows, d >> (level + 1)) uint8, radius (rows,) fp16)."""
        if not self.fused(w):
            return self.reference_codes(w)
        d = padded_width(w.shape[1])
        codes, radius = polar_fake_quant_triton(self, w, torch.empty(w.shape, device=w.device))
        return list(codes.split([d >> (lvl + 1) for lvl in range(d.bit_length() - 1)], dim=1)), radius

    def reference_codes(self, w: Tensor) -> tuple[list[Tensor], Tensor]:
        d = padded_width(w.shape[1])
        signs, cos, sin, _ = self.tables(d, w.device)
        r, codes = hadamard_rotate(w, signs), []
        for lvl in range(cos.shape[0]):
            a, b = r[:, 0::2], r[:, 1::2]
            codes.append((a[..., None] * cos[lvl] + b[..., None] * sin[lvl]).argmax(-1).to(torch.uint8))
            r = torch.sqrt(a * a + b * b)
        return codes, r[:, 0].half()

    def decode_codes(self, codes: list[Tensor], radius: Tensor, cols: int) -> Tensor:
        d = 2 * codes[0].shape[1]
        signs, cos, sin, _ = self.tables(d, radius.device)
        r = radius.float()[:, None]
        for lvl in reversed(range(len(codes))):
            c = codes[lvl].long()
            r = torch.stack((r * cos[lvl][c], r * sin[lvl][c]), dim=-1).reshape(r.shape[0], -1)
        return hadamard_unrotate(r, signs, cols)

    def encode(self, w: Tensor) -> dict:
        codes, radius = self.encode_codes(w)
        bits = self.level_bits(len(codes))
        return {"radius": radius.cpu(), "packed": [pack_bits(c.cpu(), b) for c, b in zip(codes, bits, strict=True)]}

    def decode(self, enc: dict, shape: tuple[int, ...]) -> Tensor:
        rows, cols = shape
        d = padded_width(cols)
        bits = self.level_bits(d.bit_length() - 1)
        codes = [unpack_bits(p, b, rows * (d >> (i + 1))).reshape(rows, -1)
                 for i, (p, b) in enumerate(zip(enc["packed"], bits, strict=True))]
        return self.decode_codes(codes, enc["radius"], cols)

    @torch.no_grad()
    def fake_quant_(self, w: Tensor, out: Tensor) -> None:
        """out <- decode(encode(w)) - w: one fused Triton kernel on CUDA, the torch reference elsewhere."""
        if self.fused(w):
            polar_fake_quant_triton(self, w, out)
        else:
            codes, radius = self.reference_codes(w)
            out.copy_(self.decode_codes(codes, radius, w.shape[1]) - w)


@lru_cache(maxsize=None)
def polar_tables(bits: tuple[int, ...], seed: int, d: int, device: torch.device, codebook, rotate: bool):
    kmax = 2 ** max(bits)
    ang = np.zeros((len(bits), kmax))
    for lvl, b in enumerate(bits):
        c = codebook(lvl, b)
        ang[lvl] = np.concatenate((c, np.full(kmax - len(c), c[-1])))
    signs = rotation_signs(seed, d, device) if rotate else torch.ones(d, device=device)
    to = dict(device=device, dtype=torch.float32)
    return (signs, torch.tensor(np.cos(ang), **to), torch.tensor(np.sin(ang), **to),
            torch.tensor([2 ** b for b in bits], device=device, dtype=torch.int32))


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    flat = codes.reshape(-1).numpy().astype(np.uint8)
    planes = np.unpackbits(flat[:, None], axis=1)[:, 8 - bits:]
    return torch.from_numpy(np.packbits(planes.reshape(-1)))


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    planes = np.unpackbits(packed.numpy())[:count * bits].reshape(count, bits)
    full = np.concatenate((np.zeros((count, 8 - bits), np.uint8), planes), axis=1)
    return torch.from_numpy(np.packbits(full, axis=1).reshape(-1))


if triton is not None:

    @triton.jit
    def _polar_level(r, codes_row, off, cos_ptr, sin_ptr, ncodes_ptr, LVL: tl.constexpr, KMAX: tl.constexpr):
        """One polar level: pairs of r -> nearest codebook angle (argmax of the cosine), stored as
        a code; returns the pair radii for the next level."""
        half: tl.constexpr = r.shape[0] // 2
        a, b = tl.split(tl.reshape(r, (half, 2)))
        best = tl.full((half,), float("-inf"), tl.float32)
        code = tl.zeros((half,), tl.int32)
        for j in range(tl.load(ncodes_ptr + LVL)):
            score = a * tl.load(cos_ptr + LVL * KMAX + j) + b * tl.load(sin_ptr + LVL * KMAX + j)
            take = score > best
            best, code = tl.where(take, score, best), tl.where(take, j, code)
        tl.store(codes_row + off + tl.arange(0, half), code.to(tl.uint8))
        return tl.sqrt(a * a + b * b)

    @triton.jit
    def _polar_fake_quant_kernel(w_ptr, out_ptr, codes_ptr, radius_ptr, signs_ptr, ha_ptr, hb_ptr, cos_ptr, sin_ptr,
                                 ncodes_ptr, n_cols, A: tl.constexpr, B: tl.constexpr, LEVELS: tl.constexpr,
                                 KMAX: tl.constexpr):
        """One row per program, kept in registers: rotate (H_A X H_B is H_d x for the row viewed as
        A x B), encode every polar level, decode, rotate back, write dequantized - input."""
        row = tl.program_id(0).to(tl.int64)
        D: tl.constexpr = A * B
        ia, ib = tl.arange(0, A), tl.arange(0, B)
        idx = ia[:, None] * B + ib[None, :]
        mask = idx < n_cols
        w = tl.load(w_ptr + row * n_cols + idx, mask=mask, other=0.0).to(tl.float32)
        signs = tl.load(signs_ptr + idx)
        ha = tl.load(ha_ptr + ia[:, None] * A + ia[None, :])
        hb = tl.load(hb_ptr + ib[:, None] * B + ib[None, :])
        inv_sqrt_d = 1.0 / tl.sqrt(D * 1.0)
        x = tl.dot(ha, tl.dot(w * signs, hb, input_precision="ieee"), input_precision="ieee") * inv_sqrt_d
        codes_row = codes_ptr + row * (D - 1)
        r = tl.reshape(x, (D,))
        off = 0
        for lvl in tl.static_range(LEVELS):
            r = _polar_level(r, codes_row, off, cos_ptr, sin_ptr, ncodes_ptr, lvl, KMAX)
            off += D >> (lvl + 1)
        tl.store(radius_ptr + row + tl.arange(0, 1), r.to(tl.float16))
        tl.debug_barrier()
        val = tl.full((A, B), 1.0, tl.float32) * tl.load(radius_ptr + row).to(tl.float32)
        for i in tl.static_range(LEVELS):
            lvl = LEVELS - 1 - i
            code = tl.load(codes_row + (D - (D >> lvl)) + (idx >> (lvl + 1))).to(tl.int32)
            right = ((idx >> lvl) & 1) == 1
            c = tl.load(cos_ptr + lvl * KMAX + code)
            s = tl.load(sin_ptr + lvl * KMAX + code)
            val = val * tl.where(right, s, c)
        y = tl.dot(ha, tl.dot(val, hb, input_precision="ieee"), input_precision="ieee") * inv_sqrt_d * signs
        tl.store(out_ptr + row * n_cols + idx, y - w, mask=mask)


def polar_fake_quant_triton(codec: PolarRowCodec, w: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """out <- decode(encode(w)) - w in one launch; -> (every level's codes (rows, d - 1) uint8, radius (rows,) fp16)."""
    rows, cols = w.shape
    assert out.shape == w.shape and out.is_contiguous()
    d = padded_width(cols)
    levels = d.bit_length() - 1
    a = 1 << (levels // 2)
    b = d // a
    signs, cos, sin, ncodes = codec.tables(d, w.device)
    codes = torch.empty((rows, d - 1), dtype=torch.uint8, device=w.device)
    radius = torch.empty(rows, dtype=torch.float16, device=w.device)
    _polar_fake_quant_kernel[(rows,)](w.contiguous(), out, codes, radius, signs, kv.hadamard_matrix(a, w.device),
                                      kv.hadamard_matrix(b, w.device), cos, sin, ncodes, cols, A=a, B=b,
                                      LEVELS=levels, KMAX=cos.shape[1], num_warps=4)
    return codes, radius


@dataclass(frozen=True)
class CodecSettings:
    """How every quantized matrix is coded, built once and stored in the artifact, so reading one back needs
    nothing from the trainer's config. bits: int's k, or polar's bits per level; embed_bits: the same for the
    tied embedding (its rows are also the output head, so it gets its own); kind_bits: polar's bits for the
    matrix kinds (MATRIX_KINDS) that differ from `bits`."""
    scheme: str  # int8 | int | polar
    bits: tuple[int, ...] = ()
    embed_bits: tuple[int, ...] = ()
    rotate: bool = False
    seed: int = 0
    kind_bits: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def bits_of(self, name: str) -> tuple[int, ...]:
        if name == "tok_emb.weight":
            return self.embed_bits
        return next((bits for kind, bits in self.kind_bits if name.endswith(f".{kind}.weight")), self.bits)

    def codec(self, name: str):
        bits = self.bits_of(name)
        if self.scheme == "int8":
            return Int8RowCodec()
        if self.scheme == "int":
            return IntRowCodec(bits[0], self.rotate, self.seed)
        if self.scheme == "polar":
            return PolarRowCodec(bits, self.seed)
        raise ValueError(f"weight codec {self.scheme!r} is unknown: an artifact of a newer format? re-export it")

    @property
    def label(self) -> str:
        """Short, for file and log names: int8, int6, int6r (rotated), polar."""
        return f"int{self.bits[0]}{'r' if self.rotate else ''}" if self.scheme == "int" else self.scheme

    def spec(self) -> str:
        """The settings as CODEC_COMPARE takes them: int8 | int:K:EMBED_K[:rot] | polar:BITS:EMBED_BITS[:KIND_BITS]."""
        if self.scheme == "int8":
            return "int8"
        parts = [self.scheme, ",".join(map(str, self.bits)), ",".join(map(str, self.embed_bits))]
        kinds = "/".join(f"{kind}={','.join(map(str, bits))}" for kind, bits in self.kind_bits)
        return ":".join(parts + (["rot"] if self.scheme == "int" and self.rotate else []) + ([kinds] if kinds else []))

    @classmethod
    def parse(cls, spec: str, seed: int) -> "CodecSettings":
        parts = spec.strip().split(":")
        try:
            if parts == ["int8"]:
                return cls("int8")
            bits, embed = parse_polar_bits(parts[1]), parse_polar_bits(parts[2])
            rotate = parts[3:] == ["rot"]
            kinds = parse_kind_bits(parts[3]) if parts[0] == "polar" and len(parts) == 4 else ()
            ok = (parts[0] == "int" and len(bits) == len(embed) == 1 and min(bits + embed) >= 2
                  and parts[3:] in ([], ["rot"])) or (parts[0] == "polar" and len(parts) in (3, 4))
        except (IndexError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"codec {spec!r}: expected int8, int:K:EMBED_K[:rot] (K in 2..8) or "
                             f"polar:BITS:EMBED_BITS[:KIND=BITS/...] (e.g. polar:4,3,3,3,4:5,4,4,4,5:attn.c_v=5,4,4,4,5)")
        return cls(parts[0], bits, embed, rotate or parts[0] == "polar", seed, kinds)

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> "CodecSettings":
        return cls(meta["scheme"], tuple(meta["bits"]), tuple(meta["embed_bits"]), bool(meta["rotate"]), int(meta["seed"]),
                   tuple((kind, tuple(bits)) for kind, bits in meta.get("kind_bits", ())))  # none before kind_bits


def state_hash(state: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


ARTIFACT_MAGIC, ARTIFACT_VERSION = b"PGOLFQ\x00\x01", 2
ARTIFACT_FIELDS = struct.Struct("<8sIBQ")  # magic, version, compressor id, payload bytes
ARTIFACT_HEADER = struct.Struct("<8sIBQ32s")  # the fields, then sha256(fields + payload): the header is checked too


def huffman_deflate(b: bytes) -> bytes:
    """Deflate by Huffman coding alone, no string matches (zlib.decompress reads it): on quantized codes (i.i.d.
    symbols) matches cost more than they save (Gaussian rows, int5: 4.46 bits/weight against 4.93; lzma 4.70)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return deflate.compress(b) + deflate.flush()


COMPRESSORS = {"zlib": (0, lambda b: min(zlib.compress(b, 9), huffman_deflate(b), key=len), zlib.decompress),
               "lzma": (1, lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress)}


def quantize_state(state: dict[str, Tensor], codec: CodecSettings) -> dict:
    tensors, kept = {}, {}
    for name, t in state.items():
        t = t.detach()
        if is_quantized_tensor(name, t):
            tensors[name] = {"shape": list(t.shape), **codec.codec(name).encode(t)}
            tensors[name] = {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in tensors[name].items()}
        elif t.is_floating_point() and not any(p in name for p in CONTROL_PATTERNS):
            kept[name] = t.cpu().half()
        else:
            kept[name] = t.cpu().float() if t.is_floating_point() else t.cpu()
    return {"tensors": tensors, "kept": kept}


def dequantize_state(obj: dict, codec: CodecSettings) -> dict[str, Tensor]:
    out = {name: t.float() if t.is_floating_point() else t for name, t in obj["kept"].items()}
    for name, enc in obj["tensors"].items():
        out[name] = codec.codec(name).decode(enc, tuple(enc["shape"])).float()
    return out


def non_finite_tensors(state: dict[str, Tensor]) -> list[str]:
    return [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def export_artifact(state: dict[str, Tensor], codec: CodecSettings, model_config: dict, compressor: str,
                    path: Path) -> dict:
    """Encode, compress and write atomically (tmp file, then rename). The meta holds what a fresh
    process needs to rebuild the model, and the hash of the dequantized state it must reproduce."""
    for what, tensors in (("weights", state), ("weights after the codec's roundtrip", None)):
        if tensors is None:
            obj = quantize_state(state, codec)
            tensors = dequantize_state(obj, codec)
        bad = non_finite_tensors(tensors)
        if bad:
            raise FloatingPointError(f"refusing to export non-finite {what} ({', '.join(bad[:3])}"
                                     f"{', ...' if len(bad) > 3 else ''}): the run diverged")
    obj["meta"] = {"model": model_config, "codec": codec.to_meta(), "state_hash": state_hash(tensors)}
    buf = io.BytesIO()
    torch.save(obj, buf)
    comp_id, compress, _ = COMPRESSORS[compressor]
    write_artifact(path, comp_id, compress(buf.getvalue()))
    return {"bytes": path.stat().st_size, "raw_bytes": len(buf.getvalue()), "state_hash": obj["meta"]["state_hash"]}


def compressed_sizes(path: Path) -> dict[str, int]:
    """The artifact's bytes under every compressor (its torch payload recompressed; the header included)."""
    blob = Path(path).read_bytes()
    comp_id = ARTIFACT_HEADER.unpack_from(blob)[2]
    raw = next(d for i, _, d in COMPRESSORS.values() if i == comp_id)(blob[ARTIFACT_HEADER.size:])
    return {name: ARTIFACT_HEADER.size + len(compress(raw)) for name, (_, compress, _) in COMPRESSORS.items()}


def write_artifact(path: Path, comp_id: int, payload: bytes) -> None:
    fields = ARTIFACT_FIELDS.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, comp_id, len(payload))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(fields + hashlib.sha256(fields + payload).digest() + payload)
    os.replace(tmp, path)


def load_artifact(path: Path) -> tuple[dict[str, Tensor], dict]:
    blob = Path(path).read_bytes()
    fix = "re-export it with this train_gpt.py"
    if not (blob.startswith(ARTIFACT_MAGIC) or ARTIFACT_MAGIC.startswith(blob)):
        raise ValueError(f"{path} is not a parameter-golf artifact (it starts with {blob[:8]!r}, not {ARTIFACT_MAGIC!r})")
    if len(blob) < ARTIFACT_HEADER.size:
        raise ValueError(f"artifact {path} is {len(blob)} bytes, shorter than its header: truncated; {fix}")
    _, version, comp_id, n, digest = ARTIFACT_HEADER.unpack_from(blob)
    if version != ARTIFACT_VERSION:
        raise ValueError(f"artifact {path} has format version {version}, this code reads {ARTIFACT_VERSION}; {fix}")
    payload = blob[ARTIFACT_HEADER.size:]
    if len(payload) != n:
        raise ValueError(f"artifact {path} holds {len(payload)} payload bytes, its header says {n}: truncated; {fix}")
    if hashlib.sha256(blob[:ARTIFACT_FIELDS.size] + payload).digest() != digest:
        raise ValueError(f"artifact {path} fails its sha256 checksum (header and payload): corrupted; {fix}")
    decompress = {i: d for i, _, d in COMPRESSORS.values()}.get(comp_id)
    if decompress is None:
        known = ", ".join(f"{i} ({name})" for name, (i, _, _) in COMPRESSORS.items())
        raise ValueError(f"artifact {path} names compressor id {comp_id}, which this code does not know (known: {known})")
    obj = torch.load(io.BytesIO(decompress(payload)), map_location="cpu", weights_only=True)
    meta = obj["meta"]
    state = dequantize_state(obj, CodecSettings.from_meta(meta["codec"]))
    bad = non_finite_tensors(state)
    if bad:
        raise ValueError(f"artifact {path} holds non-finite weights ({', '.join(bad[:3])}): a diverged run; retrain")
    return state, meta


# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------


class CastedLinear(nn.Linear):
    """fp32 master weight, cast to the activation dtype at matmul time. Under QAT, `qat_delta`
    holds fake_quant(w) - w, refreshed once per optimizer step: w + delta is the quantized weight
    in the forward pass and the gradient reaches w unchanged (straight-through)."""

    qat_delta: Tensor | None = None

    def effective_weight(self) -> Tensor:
        return self.weight if self.qat_delta is None else self.weight + self.qat_delta

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight().to(x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, num_kv_heads * self.head_dim, bias=False)
        self.c_v = CastedLinear(dim, num_kv_heads * self.head_dim, bias=False)
        self.proj = CastedLinear(dim, dim, bias=False)
        self.proj._zero_init = True
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32))
        inv_freq = 1.0 / (rope_base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        bsz, seqlen, dim = x.shape
        q = self.c_q(x).reshape(bsz, seqlen, self.num_heads, self.head_dim)
        k = self.c_k(x).reshape(bsz, seqlen, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).reshape(bsz, seqlen, self.num_kv_heads, self.head_dim)
        q, k = kv.norm_rotate(q, k, torch.arange(seqlen, device=x.device), self.inv_freq, self.q_gain)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return self.proj(y.transpose(1, 2).reshape(bsz, seqlen, dim))

class MLP(nn.Module):
    def __init__(self, dim: int, mlp_mult: int):
        super().__init__()
        self.fc = CastedLinear(dim, mlp_mult * dim, bias=False)
        self.proj = CastedLinear(mlp_mult * dim, dim, bias=False)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(kv.relu_square_reference(self.fc(x)))

class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_mult: int, rope_base: float, qk_gain_init: float):
        super().__init__()
        self.attn = CausalSelfAttention(dim, num_heads, num_kv_heads, rope_base, qk_gain_init)
        self.mlp = MLP(dim, mlp_mult)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(F.rms_norm(x, (x.size(-1),)))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(F.rms_norm(x, (x.size(-1),)))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, num_layers: int, model_dim: int, num_heads: int, num_kv_heads: int,
                 mlp_mult: int, tie_embeddings: bool, tied_embed_init_std: float, logit_softcap: float,
                 rope_base: float, qk_gain_init: float):
        super().__init__()
        self.logit_softcap = logit_softcap
        self.tok_emb = nn.Embedding(vocab_size, model_dim)
        self.num_encoder_layers = num_layers // 2
        self.num_decoder_layers = num_layers - self.num_encoder_layers
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_encoder_layers, self.num_decoder_layers), model_dim))
        self.blocks = nn.ModuleList(Block(model_dim, num_heads, num_kv_heads, mlp_mult, rope_base, qk_gain_init)
                                    for _ in range(num_layers))
        self.lm_head = None if tie_embeddings else CastedLinear(model_dim, vocab_size, bias=False)
        self.emb_qat_delta: Tensor | None = None
        if tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=tied_embed_init_std)
        else:
            self.lm_head._zero_init = True
        for m in self.modules():
            if isinstance(m, nn.Linear) and getattr(m, "_zero_init", False):
                nn.init.zeros_(m.weight)

    def embedding_weight(self) -> Tensor:
        w = self.tok_emb.weight
        return w if self.emb_qat_delta is None else w + self.emb_qat_delta

    def logit_weight(self) -> Tensor:
        return self.embedding_weight() if self.lm_head is None else self.lm_head.effective_weight()

    def logit_proj(self, h: Tensor) -> Tensor:
        return F.linear(h, self.logit_weight().to(h.dtype))

    def logits(self, h: Tensor) -> Tensor:
        return kv.softcap_logits(self.logit_proj(h), self.logit_softcap)

    def forward_logits(self, input_ids: Tensor) -> Tensor:
        x = F.rms_norm(F.embedding(input_ids, self.embedding_weight()), (self.tok_emb.embedding_dim,))
        x0, skips = x, []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder_layers and skips:
                x = x + self.skip_weights[i - self.num_encoder_layers].to(x.dtype) * skips.pop()
            x = block(x, x0)
            if i < self.num_encoder_layers:
                skips.append(x)
        return self.logits(F.rms_norm(x, (x.size(-1),)))

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        logits = self.forward_logits(input_ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1))

def build_model(config: dict, device: torch.device) -> GPT:
    """On CUDA, the baseline's storage: bf16 embedding (so the residual stream is bf16), fp32 matrices
    behind CastedLinear and fp32 control parameters; on CPU everything fp32."""
    model = GPT(**config).to(device)
    if device.type == "cuda":
        model.bfloat16()
        for name, p in model.named_parameters():
            if isinstance(model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model, CastedLinear) \
                    or p.ndim < 2 or any(c in name for c in CONTROL_PATTERNS):
                p.data = p.data.float()
        for block in model.blocks:
            block.attn.inv_freq = block.attn.inv_freq.float()
    return model


class QAT:
    """Refreshes every quantized weight's fake-quant delta once per optimizer step (reused by all
    micro-steps). The delta buffers exist from the start when QAT is on, so the compiled graph
    never changes when QAT switches on mid-run."""

    def __init__(self, model: GPT, args: Hyperparameters):
        self.targets = []
        self.active = False
        if args.qat_scheme == "none":
            return
        codec = args.codec_settings(args.qat_scheme)
        for name, p in model.named_parameters():
            if not is_quantized_tensor(name, p):
                continue
            owner = model if name == "tok_emb.weight" else model.get_submodule(name.rsplit(".", 1)[0])
            delta = torch.zeros_like(p)
            if name == "tok_emb.weight":
                owner.emb_qat_delta = delta
            else:
                owner.qat_delta = delta
            self.targets.append((p, delta, codec.codec(name)))

    @torch.no_grad()
    def refresh(self) -> None:
        if self.active:
            for p, delta, codec in self.targets:
                codec.fake_quant_(p.detach(), delta)

    def reset(self) -> None:
        for _, delta, _ in self.targets:
            delta.zero_()


# -----------------------------------------------------------------------------
# Muon: momentum SGD whose matrix updates are orthogonalized by 5 Newton-Schulz steps
# -----------------------------------------------------------------------------


def newton_schulz5(g: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Each rank orthogonalizes every world_size-th matrix; one all-reduce shares the updates."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, orthogonalize=newton_schulz5):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps))
        self.orthogonalize = orthogonalize

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.bfloat16)
            offset = 0
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    g = self.orthogonalize(p.grad.add(buf, alpha=group["momentum"]), group["backend_steps"])
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    flat[offset:offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(flat)
            offset = 0
            for p in params:
                p.add_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


def build_optimizers(model: GPT, args: Hyperparameters, device: torch.device) -> tuple[list, Muon]:
    named = list(model.blocks.named_parameters())
    matrices = [p for n, p in named if p.ndim == 2 and not any(c in n for c in CONTROL_PATTERNS)]
    scalars = [p for n, p in named if p.ndim < 2 or any(c in n for c in CONTROL_PATTERNS)] + [model.skip_weights]
    adam = dict(betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=device.type == "cuda")
    token_lr = args.tied_embed_lr if model.lm_head is None else args.embed_lr
    groups = [([model.tok_emb.weight], token_lr), (scalars, args.scalar_lr)]
    if model.lm_head is not None:
        groups.append(([model.lm_head.weight], args.head_lr))
    optimizers = [torch.optim.Adam([{"params": p, "lr": lr, "base_lr": lr}], **adam) for p, lr in groups]
    orth = torch.compile(newton_schulz5) if device.type == "cuda" else newton_schulz5
    muon = Muon(matrices, args.matrix_lr, args.muon_momentum, args.muon_backend_steps, orth)
    for g in muon.param_groups:
        g["base_lr"] = args.matrix_lr
    return optimizers + [muon], muon


# -----------------------------------------------------------------------------
# Evaluation: teacher-forced over all windows, the stride reference, the codec comparison (the AR eval that
# follows them lives in triton_kv_ops.py, beside the caches it drives)
# -----------------------------------------------------------------------------


def autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def eval_teacher_forced(args: Hyperparameters, model: nn.Module, d: Dist, val_tokens: Tensor, luts: ByteLUTs,
                        micro_batch_seqs: int) -> tuple[float, float]:
    """Non-overlapping TRAIN_SEQ_LEN windows, split across ranks; sums in fp64, then all-reduced."""
    seq = args.train_seq_len
    total = (val_tokens.numel() - 1) // seq
    lo, hi = total * d.rank // d.world_size, total * (d.rank + 1) // d.world_size
    sums = torch.zeros(3, device=d.device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for s in range(lo, hi, micro_batch_seqs):
        e = min(s + micro_batch_seqs, hi)
        local = val_tokens[s * seq:e * seq + 1].to(d.device)
        x, y = local[:-1].reshape(-1, seq), local[1:].reshape(-1, seq)
        with autocast(d.device):
            loss = model(x, y).detach()
        sums += torch.stack((loss.double() * y.numel(), torch.tensor(float(y.numel()), device=d.device, dtype=torch.float64),
                             luts.count(x.reshape(-1), y.reshape(-1)).sum().double()))
    if d.enabled:
        dist.all_reduce(sums)
    model.train(was_training)
    return kv.bpb(*sums.tolist())


@torch.no_grad()
def eval_sliding_window(args: Hyperparameters, model: GPT, d: Dist, tokens: Tensor, luts: ByteLUTs, stride: int,
                        micro_batch_seqs: int) -> tuple[float, float]:
    """The leaderboard's teacher-forced reference: TRAIN_SEQ_LEN windows every `stride` tokens, each scoring
    the targets no earlier window scored (the first window all of its own), so every target is scored once
    with at least TRAIN_SEQ_LEN - stride tokens of context after the first window. Split across ranks."""
    seq, n = args.train_seq_len, tokens.numel() - 1
    ends = list(range(min(seq, n), n, stride)) + [n] if n > seq else [n]
    lo, hi = len(ends) * d.rank // d.world_size, len(ends) * (d.rank + 1) // d.world_size
    sums = torch.zeros(3, device=d.device, dtype=torch.float64)
    for i in range(lo, hi, micro_batch_seqs):
        batch = ends[i:min(i + micro_batch_seqs, hi)]
        starts = [max(0, e - seq) for e in batch]
        first = [max(s, ends[j - 1] if j > 0 else 0) - s for j, s in zip(range(i, i + len(batch)), starts, strict=True)]
        x = torch.stack([tokens[s:e] for s, e in zip(starts, batch, strict=True)]).to(d.device)
        y = torch.stack([tokens[s + 1:e + 1] for s, e in zip(starts, batch, strict=True)]).to(d.device)
        scored = torch.arange(x.shape[1], device=d.device)[None, :] >= torch.tensor(first, device=d.device)[:, None]
        with autocast(d.device):
            logits = model.forward_logits(x)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        sums += torch.stack((nll.double()[scored.reshape(-1)].sum(), scored.sum().double(),
                             luts.count(x, y)[scored].sum().double()))
    if d.enabled:
        dist.all_reduce(sums)
    return kv.bpb(*sums.tolist())


def compare_codecs(args: Hyperparameters, trained: dict[str, Tensor], model: GPT, scored_model: nn.Module, d: Dist,
                   val_tokens: Tensor, luts: ByteLUTs, val_seqs: int, out: Path, log, parameters: int) -> list[dict]:
    """CODEC_COMPARE: the trained weights exported with each codec (rank 0), reloaded and rescored on every
    rank; the codecs' bytes and scores on the same weights (post-training quantization for all but the
    codec QAT trained with); bits per weight over the model's `parameters`. Leaves the model holding the last
    codec's weights: reload the shipped ones."""
    rows = []
    for spec in args.codec_compare.split():
        codec = CodecSettings.parse(spec, args.quant_seed)
        path = out / f"codec_compare_{codec.label}.ptz"
        if d.master:
            export_artifact(trained, codec, args.model_config(), args.compressor, path)
        if d.enabled:
            dist.barrier()
        state, _ = load_artifact(path)
        model.load_state_dict(state, strict=True)
        loss, score = eval_teacher_forced(args, scored_model, d, val_tokens, luts, val_seqs)
        if d.enabled:
            dist.barrier()  # every rank has read it
        if d.master:
            sizes = compressed_sizes(path)
            path.unlink()
            rows.append({"codec": codec.spec(), "val_loss": loss, "val_bpb": score, **{f"{k}_bytes": v for k, v in
                         sizes.items()}, **{f"bits_per_weight_{k}": 8 * v / parameters for k, v in sizes.items()}})
            log(f"codec_compare codec:{codec.spec()} val_loss:{loss:.8f} val_bpb:{score:.8f} "
                + " ".join(f"{k}_bytes:{v} bits_per_weight_{k}:{8 * v / parameters:.3f}" for k, v in sizes.items()))
    return rows


# -----------------------------------------------------------------------------
# main
# -----------------------------------------------------------------------------


def lr_scale(args: Hyperparameters, step: int, elapsed_ms: float, budget_ms: float | None) -> float:
    """Linear warmdown over the last WARMDOWN_ITERS steps of whichever ends the run first: ITERATIONS, or
    the wallclock cap (its remaining steps estimated from the mean step time so far)."""
    if args.warmdown_iters <= 0:
        return 1.0
    by_steps = min(max((args.iterations - step) / args.warmdown_iters, 0.0), 1.0)
    if budget_ms is None:
        return by_steps
    warmdown_ms = args.warmdown_iters * elapsed_ms / max(step, 1)
    by_clock = min(max(budget_ms - elapsed_ms, 0.0) / max(warmdown_ms, 1e-9), 1.0)
    return min(by_steps, by_clock)


def training_progress(args: Hyperparameters, step: int, elapsed_ms: float, budget_ms: float | None) -> float:
    """Fraction of the run done: whichever of the step count and the wallclock budget ends it first."""
    by_steps = step / args.iterations
    return by_steps if budget_ms is None else max(by_steps, elapsed_ms / budget_ms)


def raise_if_diverged(first_bad_step: Tensor, val_loss: float | None = None, step: int = 0) -> None:
    """One host sync, where the caller syncs anyway (a logged step, a validation, the end of training)."""
    bad = int(first_bad_step.item())
    if bad >= 0:
        raise FloatingPointError(f"train_loss was non-finite at step {bad}: lower MATRIX_LR / SCALAR_LR / "
                                 f"TIED_EMBED_LR or check the data; stopping before a broken model is exported")
    if val_loss is not None and not math.isfinite(val_loss):
        raise FloatingPointError(f"val_loss is {val_loss} at step {step}: the model diverged; stopping before a "
                                 f"broken model is exported")


def main() -> None:
    args = Hyperparameters.from_env()
    args.run_id = args.run_id or time.strftime("run_%Y%m%d_%H%M%S")
    out = Path(args.out_dir)
    log_path = out / "logs" / f"{args.run_id}.txt"
    if log_path.exists():  # checked on every rank before they meet, so none starts writing first
        raise FileExistsError(f"RUN_ID={args.run_id}: {log_path} holds an earlier run; choose another RUN_ID or "
                              f"delete that log")
    d = init_distributed()
    args.check_runs_on(d.device)
    log = RunLog(log_path if d.master else None)
    log.header()
    phases: dict[str, float] = {}
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        for backend in ("cudnn", "mem_efficient", "math"):  # the baseline's choice: flash attention only
            getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)

    sp = load_tokenizer(args)
    val_tokens = load_validation_tokens(args)
    luts = ByteLUTs.build(sp, d.device)
    grad_accum = args.grad_accum_steps or (8 // d.world_size if 8 % d.world_size == 0 else 0)
    if grad_accum == 0 or args.train_batch_tokens % (d.world_size * grad_accum * args.train_seq_len):
        raise ValueError(f"TRAIN_BATCH_TOKENS={args.train_batch_tokens} must split into WORLD_SIZE={d.world_size} x "
                         f"GRAD_ACCUM_STEPS={grad_accum or '?'} micro-batches of whole TRAIN_SEQ_LEN="
                         f"{args.train_seq_len} sequences; set GRAD_ACCUM_STEPS")
    local_tokens = args.train_batch_tokens // (d.world_size * grad_accum)

    model = build_model(args.model_config(), d.device)
    export_codec = args.codec_settings(args.weight_quant_scheme)
    qat = QAT(model, args)
    use_compile = args.compile == "1" or (args.compile == "auto" and d.device.type == "cuda")
    compiled = torch.compile(model, dynamic=False, fullgraph=True) if use_compile else model
    ddp_model = DDP(compiled, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                    broadcast_buffers=False) if d.enabled else compiled
    optimizers, muon = build_optimizers(model, args, d.device)
    log(f"model_params:{sum(p.numel() for p in model.parameters())} world_size:{d.world_size} "
        f"grad_accum_steps:{grad_accum} device:{d.device} compile:{use_compile}")
    log(f"train_batch_tokens:{args.train_batch_tokens} train_seq_len:{args.train_seq_len} iterations:{args.iterations} "
        f"max_wallclock_seconds:{args.max_wallclock_seconds} strict_wallclock:{args.strict_wallclock} "
        f"qat:{args.codec_settings(args.qat_scheme).spec() if args.qat_scheme != 'none' else 'none'} "
        f"qat_start_frac:{args.qat_start_frac} export:{export_codec.spec()} seed:{args.seed}")
    log(f"val_tokens:{val_tokens.numel() - 1} train_shards:{len(shard_paths(args.train_files))}")

    def train_step(loader: DistributedTokenLoader, scale: float) -> Tensor:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(grad_accum):
            if d.enabled:
                ddp_model.require_backward_grad_sync = micro == grad_accum - 1
            x, y = loader.next_batch(local_tokens, args.train_seq_len)
            with autocast(d.device):
                loss = ddp_model(x, y)
            loss_sum += loss.detach()
            (loss / grad_accum).backward()
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
        if args.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        qat.refresh()
        mean = loss_sum / grad_accum
        if d.enabled:
            dist.all_reduce(mean)
            mean /= d.world_size
        return mean

    phases["setup"] = time.perf_counter() - PROCESS_START
    t_compile = time.perf_counter()
    if args.warmup_steps > 0:  # prime compile/autotune, then restore the true initial state
        model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        opt_states = [copy.deepcopy(o.state_dict()) for o in optimizers]
        qat.active = bool(qat.targets)
        loader = DistributedTokenLoader(args.train_files, d)
        for _ in range(args.warmup_steps):
            train_step(loader, 1.0)
        model.load_state_dict(model_state)
        for o, s in zip(optimizers, opt_states, strict=True):
            o.load_state_dict(s)
        qat.active = False
        qat.reset()
        log(f"warmup_steps:{args.warmup_steps} done")
    kv.cuda_sync(d.device)
    phases["compile"] = time.perf_counter() - t_compile

    budget_ms = 1000.0 * args.max_wallclock_seconds if args.max_wallclock_seconds > 0 else None
    if budget_ms is not None and args.strict_wallclock:
        budget_ms -= 1000.0 * (time.perf_counter() - PROCESS_START)
    loader = DistributedTokenLoader(args.train_files, d)
    val_seqs = max(1, args.val_batch_size // (d.world_size * grad_accum * args.train_seq_len))
    train_ms, step, stop_at = 0.0, 0, None
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=d.device)  # set on the device: no sync per step
    kv.cuda_sync(d.device)
    t0 = time.perf_counter()
    while True:
        last = step == args.iterations or (stop_at is not None and step >= stop_at)
        if last or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
            kv.cuda_sync(d.device)
            train_ms += 1000.0 * (time.perf_counter() - t0)
            vl, vb = eval_teacher_forced(args, ddp_model, d, val_tokens, luts, val_seqs)
            log(f"step:{step}/{args.iterations} val_loss:{vl:.4f} val_bpb:{vb:.4f} train_time:{train_ms:.0f}ms "
                f"step_avg:{train_ms / max(step, 1):.2f}ms")
            raise_if_diverged(first_bad_step, vl, step)
            kv.cuda_sync(d.device)
            t0 = time.perf_counter()
        if last:
            break
        elapsed = train_ms + 1000.0 * (time.perf_counter() - t0)
        if not qat.active and qat.targets and training_progress(args, step, elapsed, budget_ms) >= args.qat_start_frac:
            qat.active = True
            qat.refresh()
            log(f"qat_start step:{step} scheme:{args.qat_scheme} train_time:{elapsed:.0f}ms")
        momentum_frac = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps else 1.0
        for g in muon.param_groups:
            g["momentum"] = (1 - momentum_frac) * args.muon_momentum_warmup_start + momentum_frac * args.muon_momentum
        train_loss = train_step(loader, lr_scale(args, step, elapsed, budget_ms))
        step += 1
        first_bad_step.masked_fill_((first_bad_step < 0) & ~torch.isfinite(train_loss), step)
        approx_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
        if args.train_log_every > 0 and (step <= 10 or step % args.train_log_every == 0 or stop_at is not None):
            log(f"step:{step}/{args.iterations} train_loss:{train_loss.item():.4f} train_time:{approx_ms:.0f}ms "
                f"step_avg:{approx_ms / step:.2f}ms")
            raise_if_diverged(first_bad_step)
        if stop_at is None and ranks_max(d, int(budget_ms is not None and approx_ms >= budget_ms))[0]:
            stop_at = step
    phases["train"] = train_ms / 1000.0
    tokens_per_s = step * args.train_batch_tokens / max(train_ms / 1000.0, 1e-9)
    if stop_at is not None and stop_at < args.iterations:
        log(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{args.iterations}")
    fewest, most = map(abs, ranks_max(d, -step, step))  # the max of -step is -(fewest steps), and steps are >= 0
    if fewest != most:
        raise RuntimeError(f"ranks stopped at different steps ({fewest} to {most}): their weights differ")
    log(f"train_summary steps:{step} ranks:{d.world_size} steps_on_every_rank:{fewest == most} "
        f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms "
        f"tokens_per_s:{tokens_per_s:.0f} peak_memory_allocated:{kv.peak_mem_mib(d.device):.0f}MiB")
    pre_loss, pre_bpb = vl, vb

    # Export, then every rank reloads the artifact from disk and rescores it.
    t_export = time.perf_counter()
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()} if args.codec_compare else {}
    artifact = out / f"final_model.{export_codec.label}.ptz"
    if d.master:
        stats = export_artifact(model.state_dict(), export_codec, args.model_config(), args.compressor, artifact)
    if d.enabled:
        dist.barrier()
    phases["export"] = time.perf_counter() - t_export
    t_reload = time.perf_counter()
    state, meta = load_artifact(artifact)
    model.load_state_dict(state, strict=True)
    qat.active = False
    qat.reset()
    q_loss, q_bpb = eval_teacher_forced(args, ddp_model, d, val_tokens, luts, val_seqs)
    phases["roundtrip_eval"] = time.perf_counter() - t_reload
    if not math.isfinite(q_loss):
        if d.enabled:
            dist.barrier()  # every rank has read the artifact before rank 0 deletes it
        if d.master:
            artifact.unlink()
        raise FloatingPointError(f"the reloaded artifact scores val_loss {q_loss}: deleted {artifact}")
    scheme = export_codec.label
    model_bytes, code_size = artifact.stat().st_size, sum(p.stat().st_size for p in CODE_FILES)
    total_bytes = model_bytes + code_size
    if d.master:
        log(f"Serialized model {scheme}+{args.compressor}: {stats['bytes']} bytes (torch payload before "
            f"compression: {stats['raw_bytes']} bytes)")
    log(f"Code size: {code_size} bytes ({', '.join(p.name for p in CODE_FILES)})")
    log(f"Total submission size {scheme}+{args.compressor}: {total_bytes} bytes")
    if total_bytes > 16_000_000:
        log(f"WARNING: SUBMISSION OVER LIMIT: {total_bytes} bytes > 16,000,000 by {total_bytes - 16_000_000} bytes")
    log(f"final_{scheme}_{args.compressor}_roundtrip_exact val_loss:{q_loss:.8f} val_bpb:{q_bpb:.8f} "
        f"pre_roundtrip_val_bpb:{pre_bpb:.8f} state_hash:{meta['state_hash'][:16]}")
    parameters = sum(t.numel() for t in state.values())
    if args.codec_compare:
        t_compare = time.perf_counter()
        codec_rows = compare_codecs(args, trained, model, ddp_model, d, val_tokens, luts, val_seqs, out, log,
                                    parameters)
        model.load_state_dict(state, strict=True)
        phases["codec_compare"] = time.perf_counter() - t_compare

    # References on the comparison slice (every rank); then, out of the process group, rank 0's autoregressive evals.
    summary = {"run_id": args.run_id, "world_size": d.world_size, "steps": step,
               "step_avg_ms": train_ms / max(step, 1), "tokens_per_s": tokens_per_s,
               "peak_mem_mib": kv.peak_mem_mib(d.device), "pre_roundtrip_val_bpb": pre_bpb,
               "pre_roundtrip_val_loss": pre_loss, "roundtrip_val_bpb": q_bpb, "roundtrip_val_loss": q_loss,
               "model_bytes": model_bytes, "code_bytes": code_size, "total_bytes": total_bytes,
               "scheme": scheme, "codec": export_codec.spec(), "qat": args.qat_scheme, "state_hash": meta["state_hash"],
               "parameters": parameters, "bits_per_weight": 8 * model_bytes / parameters,
               "hparams": dataclasses.asdict(args), "codec_compare": codec_rows if args.codec_compare else []}
    ar_settings = args.ar_eval_settings()
    scored_tokens, compare_tokens = ar_settings.token_slices(val_tokens)
    t_ref = time.perf_counter()
    references = {"windows": eval_teacher_forced(args, ddp_model, d, compare_tokens, luts, val_seqs)}
    log(f"final_teacher_forced_windows tokens:{(compare_tokens.numel() - 1) // args.train_seq_len * args.train_seq_len} "
        f"val_loss:{references['windows'][0]:.8f} val_bpb:{references['windows'][1]:.8f}")
    if args.eval_stride > 0:
        references["sliding"] = eval_sliding_window(args, model, d, compare_tokens, luts, args.eval_stride, val_seqs)
        log(f"final_sliding_window_reference stride:{args.eval_stride} tokens:{compare_tokens.numel() - 1} "
            f"val_loss:{references['sliding'][0]:.8f} val_bpb:{references['sliding'][1]:.8f} "
            f"seconds:{time.perf_counter() - t_ref:.2f}")
    phases["reference_evals"] = time.perf_counter() - t_ref
    summary["references"] = {k: {"val_loss": v[0], "val_bpb": v[1]} for k, v in references.items()}
    del ddp_model
    leave_process_group(d)
    if d.master:
        summary["ar_eval"] = kv.final_ar_evals(ar_settings, model, scored_tokens, compare_tokens, references,
                                               luts, d.device, log, phases)
        phases["total"] = time.perf_counter() - PROCESS_START
        log("phase_times " + " ".join(f"{k}:{v:.2f}s" for k, v in phases.items()))
        summary["phases"] = phases
        summary_path = out / "logs" / f"{args.run_id}.json"
        summary_path.with_suffix(".json.tmp").write_text(json.dumps(summary, indent=2, default=str, allow_nan=False))
        os.replace(summary_path.with_suffix(".json.tmp"), summary_path)
    end_run(d)

if __name__ == "__main__":
    main()
