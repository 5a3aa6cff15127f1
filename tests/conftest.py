import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # every Triton kernel runs on the CPU against its torch reference
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

TOKENIZER = ROOT / "data" / "tokenizers" / "fineweb_1024_bpe.model"
SAMPLE = ROOT / "data" / "sample"


def pytest_configure(config):
    """An interpreter that cannot run the kernels stops the suite at once, with the fix, not in each kernel's test."""
    import triton_kv_ops

    problem = triton_kv_ops.interpreter_problem()
    if problem:
        raise pytest.UsageError(f"TRITON_INTERPRET=1: {problem}")


@pytest.fixture(autouse=True)
def seeded_rngs():
    """Every test draws from freshly seeded generators: its inputs never depend on which tests ran before it."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    from data.build_shards import build

    out = tmp_path_factory.mktemp("sample_sp1024")
    build([SAMPLE / "fineweb_edu_sample.txt"], "file", TOKENIZER, out, 0.15, 100_000_000)
    return out


def load_benchmark(name: str, monkeypatch):
    """benchmarks/<name>.py as a module, in sys.modules for the test (a dataclass looks its module up there)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def tiny_env(data_path: Path, out_dir: Path, **overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k.upper() not in _HPARAM_NAMES}
    env.update(DATA_PATH=str(data_path), TOKENIZER_PATH=str(TOKENIZER), OUT_DIR=str(out_dir), RUN_ID="t",
               NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_SEQ_LEN="64",
               TRAIN_BATCH_TOKENS="1024", ITERATIONS="4", WARMUP_STEPS="0", VAL_LOSS_EVERY="0", WARMDOWN_ITERS="0",
               VAL_MAX_TOKENS="2048", TRAIN_LOG_EVERY="1", KV_QUANT_BACKEND="int8", KV_EVAL_MAX_TOKENS="256",
               KV_EVAL_BATCH="4", MAX_WALLCLOCK_SECONDS="0", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")  # CPU runs on any machine: on a GPU one, 2 ranks would want 2 GPUs and NCCL
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def _names():
    import dataclasses

    import train_gpt

    return {f.name.upper() for f in dataclasses.fields(train_gpt.Hyperparameters)}


_HPARAM_NAMES = _names()
