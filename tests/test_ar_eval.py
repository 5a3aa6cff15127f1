"""The autoregressive eval: exact backend == teacher-forced, sliding windows keep relative RoPE
positions, and the fresh-process isolation check."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

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
    decoder = model.for_decode(torch.float32)
    with torch.no_grad():
        for t in range(steps):
            logits = decoder.decode_step(tokens[:, t], torch.full((2,), t), caches)
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


@pytest.mark.parametrize("layers", [1, 2, 5])
def test_decode_matches_the_full_forward_at_every_position(layers):
    """decode_hidden's fused residual stream (the U-Net skips included) against forward_logits."""
    args, model = tiny_model(3, layers)
    tokens = torch.randint(0, 1024, (2, 12))
    caches = [tg.kv.make_kv_cache("bf16", 2, 2, 4, 16, 16, "cpu", torch.float32) for _ in model.blocks]
    decoder = model.for_decode(torch.float32)
    with torch.no_grad():
        stepped = torch.stack([decoder.decode_step(tokens[:, t], torch.full((2,), t), caches) for t in range(12)], 1)
        torch.testing.assert_close(stepped, model.forward_logits(tokens), rtol=0, atol=1e-4)


@pytest.mark.parametrize("skip_self, has_skip, has_mix, has_delta", [(False, False, True, False), (True, False, True, True),
                                                                     (False, True, True, True), (False, False, False, True)])
def test_residual_norm_kernel_matches_reference(skip_self, has_skip, has_mix, has_delta):
    torch.manual_seed(0)
    b, n = 3, 96  # n not a power of two: masked lanes
    x, delta, skip, x0 = (torch.randn(b, n) for _ in range(4))
    kwargs = dict(delta=delta if has_delta else None, delta_scale=torch.rand(n) if has_delta else None,
                  skip=skip if has_skip else None, skip_weight=torch.rand(n) if has_skip or skip_self else None,
                  skip_self=skip_self, x0=x0 if has_mix else None, mix=torch.rand(2, n) if has_mix else None)
    for got, want in zip(tg.kv.residual_norm_triton(x, **kwargs), tg.kv.residual_norm_reference(x, **kwargs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, n, k, relu_square", [(1, 96, 64, False), (3, 10, 1100, True)])
def test_small_batch_linear_kernel_matches_reference(rows, n, k, relu_square):
    torch.manual_seed(0)
    x, w = torch.randn(rows, k), torch.randn(n, k) / 30
    want = F.linear(x, w)
    want = tg.kv.relu_square_reference(want) if relu_square else want
    torch.testing.assert_close(tg.kv.small_batch_linear_triton(x, w, relu_square), want, rtol=1e-5, atol=1e-5)


def test_relu_square_kernel_matches_reference():
    x = torch.randn(3, 1500)  # not a multiple of the block
    torch.testing.assert_close(tg.kv.relu_square_triton(x), tg.kv.relu_square_reference(x))


def test_score_next_token_kernel_matches_reference():
    torch.manual_seed(0)
    rows = torch.randint(0, 1000, (4, 9))
    proj, weight = torch.randn(4, 1000) * 40, torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    positions = {name: torch.tensor([5, 5, -(1 << 62), 7]) for name in ("kernel", "torch")}
    loss = {name: torch.full((4,), 2.0, dtype=torch.float64) for name in positions}
    for name, score in (("kernel", tg.kv.score_next_token_triton), ("torch", tg.kv.score_next_token_reference)):
        score(proj, rows, positions[name], weight, loss[name], 30.0)
    torch.testing.assert_close(loss["kernel"], loss["torch"], rtol=1e-5, atol=1e-5)
    assert loss["kernel"][2] == 2.0  # an inactive row adds nothing
    assert positions["kernel"].tolist() == positions["torch"].tolist() == [6, 6, -(1 << 62) + 1, 8]


def test_fused_decoder_matches_the_torch_path(sample_shards, monkeypatch):
    """The whole fused step (residual / scoring kernels, int8_triton prologue + attention, under the
    interpreter) scores the same as the torch references, padded rows included. (The small-batch linear
    kernel has its own test: under the interpreter it would take minutes here.)"""
    import sentencepiece as spm

    args, model = tiny_model(4, layers=2)
    args.data_path, args.val_max_tokens, args.kv_eval_batch = str(sample_shards), 48 * 3, 4
    val = tg.load_validation_tokens(args)
    luts = tg.ByteLUTs.build(spm.SentencePieceProcessor(model_file=str(TOKENIZER)), torch.device("cpu"))
    torch_path = tg.autoregressive_eval(args, model, val, luts, "int8", torch.device("cpu"), print)
    monkeypatch.setattr(tg.kv, "use_decode_kernels", lambda device: True)
    monkeypatch.setattr(tg.kv, "SMALL_BATCH_ROWS", 0)
    fused = tg.autoregressive_eval(args, model, val, luts, "int8_triton", torch.device("cpu"), print)
    assert abs(fused["val_bpb"] - torch_path["val_bpb"]) < 2e-3 and fused["tokens"] == torch_path["tokens"] == 144
    exact = tg.kv.exact_backend(torch.device("cpu"))  # with the kernels on: the Triton exact backend
    assert exact == "bf16_triton"
    teacher_forced = tg.eval_teacher_forced(args, model, tg.Dist(), val, luts, 3)[1]
    assert abs(tg.autoregressive_eval(args, model, val, luts, exact, torch.device("cpu"), print)["val_bpb"]
               - teacher_forced) < 1e-5

