"""The autoregressive eval: exact backend == teacher-forced, sliding windows keep relative RoPE
positions, and the fresh-process isolation check."""

import json
import subprocess
import sys

import pytest
import torch

import train_gpt as tg
from conftest import ROOT, TOKENIZER


def tiny_model(seed=0, layers=3):
    torch.manual_seed(seed)
    args = tg.Hyperparameters(num_layers=layers, model_dim=64, num_heads=4, num_kv_heads=2, train_seq_len=48,
                              kv_eval_batch=4, kv_group_size=16, kv_eval_cuda_graph=False)
    model = tg.build_model(args.model_config(), torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return args, model.eval()


def test_exact_backend_reproduces_teacher_forced_score(sample_shards):
    import sentencepiece as spm

    args, model = tiny_model()
    args.data_path, args.val_max_tokens = str(sample_shards), 48 * 10
    val = tg.load_validation_tokens(args)
    luts = tg.ByteLUTs.build(spm.SentencePieceProcessor(model_file=str(TOKENIZER)), torch.device("cpu"))
    tf_loss, tf_bpb = tg.eval_teacher_forced(args, model, tg.Dist(), val, luts, 3)
    ar = tg.autoregressive_eval(args, model, val, luts, "bf16", torch.device("cpu"), print)
    assert ar["tokens"] == 480 and ar["batch"] == 4  # 10 windows in batches of 4, the last one padded
    assert abs(ar["val_bpb"] - tf_bpb) < 1e-5 and abs(ar["val_loss"] - tf_loss) < 1e-5
    int8 = tg.autoregressive_eval(args, model, val, luts, "int8", torch.device("cpu"), print)
    assert 0 < abs(int8["val_bpb"] - tf_bpb) < 5e-3


@pytest.mark.parametrize("backend", ["bf16", "int8"])
def test_sliding_cache_keeps_relative_positions(backend):
    """One layer, so every cached K/V depends only on its own token and absolute position: the ring
    cache's last step must then equal a fresh forward over the last window at positions 0..C-1."""
    args, model = tiny_model(1, layers=1)
    context, steps = 16, 40
    tokens = torch.randint(0, 1024, (2, steps))
    cfg = tg.kv.KVConfig(group_size=16)
    caches = [tg.kv.make_kv_cache(backend, 2, 2, 4, context, 16, "cpu", torch.float32, cfg) for _ in model.blocks]
    with torch.no_grad():
        for t in range(steps):
            logits = model.decode_step(tokens[:, t], torch.full((2,), t), caches)
        fresh = model.forward_logits(tokens[:, steps - context:])[:, -1]
    assert caches[0].lengths.tolist() == [context, context]
    tol = 1e-4 if backend == "bf16" else 0.15
    torch.testing.assert_close(logits, fresh, rtol=0, atol=tol)


def test_isolation_check_on_a_tiny_cpu_model(sample_shards, tmp_path):
    args, model = tiny_model(2)
    args.weight_quant_scheme = "polar"
    artifact = tmp_path / "final_model.polar.ptz"
    stats = tg.export_artifact(model.state_dict(), args, artifact)
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, str(ROOT / "artifact_isolation_check.py"), str(artifact), "--data-path",
                    str(sample_shards), "--tokenizer", str(TOKENIZER), "--val-tokens", "512", "--seq-len", "64",
                    "--steps", "24", "--generate", "8", "--out", str(report)], check=True, cwd=tmp_path,
                   capture_output=True)
    r = json.loads(report.read_text())
    assert r["state_hash"] == stats["state_hash"] and r["val_tokens"] == 512 and r["val_bpb"] > 0
    assert isinstance(r["continuation"], str) and r["profile_steps"] == 24 and r["cache_tensor_bytes"] > 0
