"""End-to-end training runs on real text (CPU, fp32), one process and 2-process gloo torchrun."""

import json
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import ROOT, tiny_env


def run(env, nproc=1, timeout=600):
    cmd = [sys.executable, str(ROOT / "train_gpt.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train_gpt.py")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def losses(out):
    return [float(x) for x in re.findall(r"train_loss:([0-9.]+)", out)]


def test_loss_decreases_on_real_text(sample_shards, tmp_path):
    out = run(tiny_env(sample_shards, tmp_path, ITERATIONS=25, TRAIN_BATCH_TOKENS=2048, TIED_EMBED_LR=0.02))
    ls = losses(out)
    assert len(ls) == 25 and sum(ls[-5:]) / 5 < ls[0] - 0.5, ls
    assert re.search(r"final_int8_zlib_roundtrip_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}", out)
    summary = json.loads((tmp_path / "logs" / "t.json").read_text())
    assert summary["total_bytes"] == summary["model_bytes"] + summary["code_bytes"]


def test_two_rank_gloo_matches_one_rank_and_finishes_rank0_eval(sample_shards, tmp_path):
    one = run(tiny_env(sample_shards, tmp_path / "a", GRAD_ACCUM_STEPS=2, ITERATIONS=3))
    two = run(tiny_env(sample_shards, tmp_path / "b", GRAD_ACCUM_STEPS=1, ITERATIONS=3), nproc=2)
    assert len(losses(one)) == 3 and losses(one) == pytest.approx(losses(two), abs=1e-4)
    assert "world_size:2 grad_accum_steps:1" in two
    assert "final_kv_eval_exact backend:int8" in two  # rank 0's eval ran; torchrun saw every rank exit 0


def test_wallclock_cap_stops_every_rank(sample_shards, tmp_path):
    out = run(tiny_env(sample_shards, tmp_path, ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=2, TRAIN_LOG_EVERY=0,
                       KV_EVAL_MAX_TOKENS=64), nproc=2)
    m = re.search(r"stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/100000", out)
    assert m and int(m.group(2)) < 100000


def _agree(rank, path, results):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    results[rank] = tg.all_ranks_agree(rank == 0, tg.Dist(rank, 2))
    dist.destroy_process_group()


def test_stop_decision_is_agreed_across_ranks(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_agree, args=(str(tmp_path / "rdv"), results), nprocs=2)
    assert dict(results) == {0: True, 1: True}


def test_non_finite_loss_stops_the_run(sample_shards, tmp_path):
    env = tiny_env(sample_shards, tmp_path, MATRIX_LR=1e30, SCALAR_LR=1e30, TIED_EMBED_LR=1e30)
    p = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode != 0 and "train_loss is nan" in p.stderr + p.stdout
    assert not list(tmp_path.glob("*.ptz"))


def test_lr_warmdown_follows_the_wallclock():
    args = tg.Hyperparameters(warmdown_iters=100)
    assert tg.lr_scale(args, 10, 1000.0, 600_000.0) == 1.0
    assert tg.lr_scale(args, 1000, 590_000.0, 600_000.0) == pytest.approx(10_000 / (100 * 590.0))
    assert tg.lr_scale(tg.Hyperparameters(iterations=200, warmdown_iters=100), 150, 0.0, None) == 0.5


def test_qat_starts_by_steps_or_by_clock_whichever_comes_first():
    args = tg.Hyperparameters(iterations=100)
    assert tg.training_progress(args, 50, 1000.0, 600_000.0) == 0.5  # a run ending on ITERATIONS
    assert tg.training_progress(args, 10, 300_000.0, 600_000.0) == 0.5  # a run ending on the wallclock
    assert tg.training_progress(args, 25, 0.0, None) == 0.25


def test_model_matches_its_shape_contract():
    model = tg.build_model(tg.Hyperparameters().model_config(), torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) == 17_059_912  # the baseline's parameter count
    assert model.blocks[0].attn.q_gain.tolist() == [1.5] * 8 and model.skip_weights.shape == (4, 512)
    assert float(model.blocks[3].mlp.proj.weight.detach().abs().max()) == 0.0


def test_two_rank_polar_qat_roundtrip_is_lossless(sample_shards, tmp_path):
    """DDP + polar QAT from the first step + polar export: the reloaded artifact scores what training saw."""
    out = run(tiny_env(sample_shards, tmp_path, MODEL_DIM=128, ITERATIONS=3, QAT_SCHEME="polar", QAT_START_FRAC=0,
                       WEIGHT_QUANT_SCHEME="polar", GRAD_ACCUM_STEPS=1), nproc=2)
    m = re.search(r"final_polar_zlib_roundtrip_exact val_loss:\S+ val_bpb:(\S+) pre_roundtrip_val_bpb:(\S+)", out)
    assert "qat_start step:0 scheme:polar" in out and m
    assert abs(float(m.group(1)) - float(m.group(2))) < 1e-4
