"""End-to-end training runs on real text (CPU, fp32), one process and 2-process gloo torchrun."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import ROOT, tiny_env


def launch(env, nproc=1, timeout=600, script=ROOT / "train_gpt.py") -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(script)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run(env, nproc=1, timeout=600, script=ROOT / "train_gpt.py"):
    p = launch(env, nproc, timeout, script)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def fails(env, message, nproc=1) -> str:
    """The run exits non-zero, names the problem, and leaves neither an artifact nor a JSON summary."""
    p = launch(env, nproc)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and message in out, out[-3000:]
    out_dir = Path(env["OUT_DIR"])
    assert not list(out_dir.glob("*.ptz*")) and not list(out_dir.glob("logs/*.json")), list(out_dir.rglob("*"))
    return out


def losses(out):
    return [float(x) for x in re.findall(r"train_loss:([0-9.]+)", out)]


def test_loss_decreases_on_real_text(sample_shards, tmp_path):
    out = run(tiny_env(sample_shards, tmp_path, ITERATIONS=25, TRAIN_BATCH_TOKENS=2048, TIED_EMBED_LR=0.02,
                       EVAL_STRIDE=16, KV_EVAL_MAX_TOKENS=384, KV_EVAL_COMPARE_TOKENS=256,
                       KV_EVAL_COMPARE_BACKENDS="qjl"))
    ls = losses(out)
    assert len(ls) == 25 and sum(ls[-5:]) / 5 < ls[0] - 0.5, ls
    assert re.search(r"final_int8_zlib_roundtrip_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}", out)
    summary = json.loads((tmp_path / "logs" / "t.json").read_text())
    assert summary["total_bytes"] == summary["model_bytes"] + summary["code_bytes"]
    # One line per eval, each named for what it is; only the exact backend's lines say "exact".
    assert re.search(r"^final_ar_scored backend:int8 mode:ring context:64 .* tokens:384 ", out, re.M)
    assert re.search(r"^final_ar_exact_reference backend:bf16 mode:ring .* tokens:256 .* delta_vs_sliding_window:", out, re.M)
    assert re.search(r"^final_ar_comparison backend:qjl mode:ring .* tokens:256 .* delta_vs_exact:", out, re.M)
    assert re.search(r"^final_sliding_window_reference stride:16 tokens:256 ", out, re.M)
    check = re.search(r"^final_ar_windows_check backend:bf16 mode:windows .* delta_vs_teacher_forced:(\S+)", out, re.M)
    assert abs(float(check.group(1))) < 1e-5
    assert re.search(r"^eval_budget scored_backend:int8 .* challenge_split_tokens:62021632 batch:4 ", out, re.M)
    tagged_exact = [line for line in out.splitlines() if "exact" in line.split(" ", 1)[0] and "backend:" in line]
    assert tagged_exact and all(re.search(r"backend:bf16\b", line) for line in tagged_exact)
    assert {"scored", "exact_ring", "exact_windows", "compare_int8", "compare_qjl"} == set(summary["ar_eval"])
    assert summary["ar_eval"]["scored"]["tokens"] == 384 and "sliding" in summary["references"]


def test_two_rank_gloo_matches_one_rank_and_finishes_rank0_eval(sample_shards, tmp_path):
    one = run(tiny_env(sample_shards, tmp_path / "a", GRAD_ACCUM_STEPS=2, ITERATIONS=3))
    two = run(tiny_env(sample_shards, tmp_path / "b", GRAD_ACCUM_STEPS=1, ITERATIONS=3), nproc=2)
    assert len(losses(one)) == 3 and losses(one) == pytest.approx(losses(two), abs=1e-4)
    assert "world_size:2 grad_accum_steps:1" in two
    assert "final_ar_scored backend:int8" in two  # rank 0's eval ran; torchrun saw every rank exit 0


def test_wallclock_cap_stops_every_rank(sample_shards, tmp_path):
    out = run(tiny_env(sample_shards, tmp_path, ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=2, TRAIN_LOG_EVERY=0,
                       KV_EVAL_MAX_TOKENS=64), nproc=2)
    m = re.search(r"stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/100000", out)
    assert m, out[-2000:]
    train_ms, steps = int(m.group(1)), int(m.group(2))
    summary = re.search(r"train_summary steps:(\d+) ranks:(\d+) steps_on_every_rank:(\w+) .*step_avg:([\d.]+)ms", out)
    assert summary.groups()[:3] == (str(steps), "2", "True")  # both ranks took the same number of steps
    assert 2000 <= train_ms <= 2000 + 3 * float(summary.group(4)) + 250  # stopped within a few steps of the cap


def _agree(rank, path, results):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    steps = (5, 7)[rank]
    results[rank] = tg.ranks_max(tg.Dist(rank, 2), int(rank == 0), -steps, steps)
    dist.destroy_process_group()


def test_stop_decision_and_step_range_are_agreed_across_ranks(tmp_path):
    """Rank 0 alone wants to stop: both stop. Ranks at 5 and 7 steps: both see the range (fewest 5, most 7)."""
    results = mp.Manager().dict()
    mp.spawn(_agree, args=(str(tmp_path / "rdv"), results), nprocs=2)
    assert dict(results) == {0: [1, -5, 7], 1: [1, -5, 7]}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts gloo's worker threads by name in /proc")
def test_two_rank_run_leaves_no_gloo_threads_and_rank1_waits_for_rank0(sample_shards, tmp_path):
    """The 2-rank runs aborted at exit, 2 in 183: a gloo worker still releasing a collective's tensors while the
    interpreter finalized, the group kept alive past destroy_process_group. And no rank may exit before rank 0's
    evals are done: torchrun would stop rank 0 if that exit failed."""
    out = run(tiny_env(sample_shards, tmp_path, GRAD_ACCUM_STEPS=1, ITERATIONS=2), nproc=2,
              script=ROOT / "tests" / "rank_exit_probe.py")
    # the ranks share torchrun's stdout: a line's text and its newline are two writes, so lines can run together
    left = dict(re.findall(r"probe_leave rank:(\d) (gloo_workers_before:\d+ after:\d+)", out))
    assert left == {r: "gloo_workers_before:2 after:0" for r in "01"}, out[-3000:]
    end = {r: (float(a), float(b))
           for r, a, b in re.findall(r"probe_end rank:(\d) entered:([\d.]+\d) returned:([\d.]+\d)", out)}
    assert end["1"][1] >= end["0"][0]  # rank 1 left end_run after rank 0, its AR evals done, entered it


@pytest.mark.parametrize("log_every", [0, 3])
def test_non_finite_loss_stops_the_run(sample_shards, tmp_path, log_every):
    """The loss turns non-finite at a step that is not logged (TRAIN_LOG_EVERY=0 logs none)."""
    env = tiny_env(sample_shards, tmp_path, ITERATIONS=6, MATRIX_LR=1e30, SCALAR_LR=1e30, TIED_EMBED_LR=1e30,
                   TRAIN_LOG_EVERY=log_every)
    out = fails(env, "train_loss was non-finite at step 3:")
    assert "step:3/6 train_loss:nan" in out if log_every else "train_loss:" not in out


@pytest.mark.parametrize("lr, message", [
    ("SCALAR_LR", "val_loss is nan at step 1"),  # huge gains: the final score is NaN
    ("MATRIX_LR", "refusing to export non-finite weights after the codec's roundtrip"),  # finite, but overflow fp16 scales
])
def test_non_finite_final_model_stops_the_run(sample_shards, tmp_path, lr, message):
    """One step from finite weights, so its train_loss is finite; the update breaks the model."""
    fails(tiny_env(sample_shards, tmp_path, ITERATIONS=1, TRAIN_LOG_EVERY=0, **{lr: 1e30}), message)


def test_a_triton_backend_on_a_cpu_fails_before_training(sample_shards, tmp_path):
    env = {k: v for k, v in tiny_env(sample_shards, tmp_path, KV_EVAL_COMPARE_BACKENDS="qjl_triton").items()
           if k != "TRITON_INTERPRET"}
    out = fails(env, "KV_EVAL_COMPARE_BACKENDS=qjl_triton: its Triton kernels need a CUDA GPU")
    assert "use qjl (its torch reference)" in out and "train_loss" not in out
    env["KV_QUANT_BACKEND"] = "int8_triton"
    assert "use int8 (its torch reference)" in fails(env, "KV_QUANT_BACKEND=int8_triton: its Triton kernels need a CUDA GPU")


def test_a_plain_run_on_a_cpu_picks_backends_that_run_there(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = tg.Hyperparameters()
    args.check_runs_on(torch.device("cpu"))
    assert args.kv_quant_backend == "int8" and tg.kv.exact_backend(torch.device("cpu")) == "bf16"


@pytest.mark.parametrize("env", [{"KV_QUANT_BACKEND": "tq4_triton", "KV_EVAL_CONTEXT_LEN": "1000"},
                                 {"KV_EVAL_COMPARE_BACKENDS": "tq4_triton", "TRAIN_SEQ_LEN": "1000"}])
def test_a_context_of_part_tiles_is_refused_before_training(env):
    """tq4_triton reads its cache in tiles of 64 entries: a run whose AR eval context (KV_EVAL_CONTEXT_LEN, else
    TRAIN_SEQ_LEN) is not a multiple of 64 is refused at its start, naming the setting; a multiple of 64 runs."""
    args = tg.Hyperparameters.from_env(env)
    with pytest.raises(ValueError, match="context of 1000 .* not a multiple of 64; set KV_EVAL_CONTEXT_LEN"):
        args.check_runs_on(torch.device("cpu"))
    args = tg.Hyperparameters.from_env({**env, "KV_EVAL_CONTEXT_LEN": "960"})
    args.check_runs_on(torch.device("cpu"))
    assert args.ar_eval_settings().context == 960


def test_a_reused_run_id_is_refused(sample_shards, tmp_path):
    env = tiny_env(sample_shards, tmp_path, ITERATIONS=1, KV_EVAL_MAX_TOKENS=64)
    run(env)
    log = (tmp_path / "logs" / "t.txt").read_text()
    p = launch(env)
    assert p.returncode != 0 and "RUN_ID=t: " in p.stderr and "choose another RUN_ID" in p.stderr
    assert (tmp_path / "logs" / "t.txt").read_text() == log


def test_lr_warmdown_follows_the_wallclock():
    args = tg.Hyperparameters(warmdown_iters=100)
    assert tg.lr_scale(args, 10, 1000.0, 600_000.0) == 1.0
    assert tg.lr_scale(args, 1000, 590_000.0, 600_000.0) == pytest.approx(10_000 / (100 * 590.0))
    assert tg.lr_scale(tg.Hyperparameters(iterations=200, warmdown_iters=100), 150, 0.0, None) == 0.5
    # a capped run that ends on ITERATIONS first still warms down (the sample's settings, 140 of 150 steps)
    assert tg.lr_scale(tg.Hyperparameters(iterations=150, warmdown_iters=50), 140, 63_700.0, 240_000.0) == pytest.approx(0.2)


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
    """DDP + polar QAT from the first step + polar export, two matrix kinds at bits of their own: the reloaded artifact
    scores what training saw."""
    out = run(tiny_env(sample_shards, tmp_path, MODEL_DIM=128, ITERATIONS=3, QAT_SCHEME="polar", QAT_START_FRAC=0,
                       WEIGHT_QUANT_SCHEME="polar", GRAD_ACCUM_STEPS=1, POLAR_KIND_BITS="attn.c_v=5,4/mlp.fc=3"), nproc=2)
    m = re.search(r"final_polar_zlib_roundtrip_exact val_loss:\S+ val_bpb:(\S+) pre_roundtrip_val_bpb:(\S+)", out)
    assert "qat_start step:0 scheme:polar" in out and m
    assert "export:polar:4,3,3,3,4:5,4,4,4,5:attn.c_v=5,4/mlp.fc=3 " in out
    assert abs(float(m.group(1)) - float(m.group(2))) < 1e-4


def test_codec_compare_rescores_the_trained_weights_per_codec(sample_shards, tmp_path):
    out = run(tiny_env(sample_shards, tmp_path, MODEL_DIM=128, ITERATIONS=3, WEIGHT_QUANT_SCHEME="int", INT_BITS=6,
                       INT_EMBED_BITS=6, CODEC_COMPARE="int8 int:4:4:rot polar:3,3,3,3,4:3,3,3,3,4",
                       KV_EVAL_MAX_TOKENS=2048, KV_EVAL_COMPARE_TOKENS=2048))
    summary = json.loads((tmp_path / "logs" / "t.json").read_text())
    rows = {r["codec"]: r for r in summary["codec_compare"]}
    assert list(rows) == ["int8", "int:4:4:rot", "polar:3,3,3,3,4:3,3,3,3,4"] and summary["codec"] == "int:6:6"
    assert rows["int8"]["zlib_bytes"] > rows["int:4:4:rot"]["zlib_bytes"]
    assert [p.name for p in tmp_path.glob("*.ptz")] == ["final_model.int6.ptz"]  # the comparisons' are gone
    assert re.search(r"^codec_compare codec:int:4:4:rot val_loss:\S+ val_bpb:\S+ zlib_bytes:\d+ bits_per_weight_zlib:\S+ "
                     r"lzma_bytes:\d+", out, re.M)
    # the evals after the comparisons score the shipped weights again: the whole split, as the roundtrip did
    check = re.search(r"^final_teacher_forced_windows tokens:2048 val_loss:\S+ val_bpb:(\S+)", out, re.M)
    assert float(check.group(1)) == pytest.approx(summary["roundtrip_val_bpb"], abs=1e-8)
