"""The autoregressive eval: exact backend == teacher-forced, sliding windows keep relative RoPE
positions, and the fresh-process isolation check."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
import triton_kv_ops as kv
from conftest import ROOT, TOKENIZER, load_benchmark


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
    plan = kv.window_plan(val, args.train_seq_len)
    ar = kv.autoregressive_eval(args.ar_eval_settings(), model, plan, luts, "bf16", torch.device("cpu"), print)
    assert ar["tokens"] == 480 and ar["batch"] == 4  # 10 windows in batches of 4, the last one padded
    assert abs(ar["val_bpb"] - tf_bpb) < 1e-5 and abs(ar["val_loss"] - tf_loss) < 1e-5
    int8 = kv.autoregressive_eval(args.ar_eval_settings(), model, plan, luts, "int8", torch.device("cpu"), print)
    assert 0 < abs(int8["val_bpb"] - tf_bpb) < 5e-3


@pytest.mark.parametrize("backend", ["bf16", "int8"])
def test_sliding_cache_keeps_relative_positions(backend):
    """One layer, so every cached K/V depends only on its own token and absolute position: the ring
    cache's last step must then equal a fresh forward over the last window at positions 0..C-1."""
    args, model = tiny_model(1, layers=1)
    context, steps = 16, 40
    tokens = torch.randint(0, 1024, (2, steps))
    cfg = kv.KVConfig(group_size=16)
    caches = [kv.make_kv_cache(backend, 2, 2, 4, context, 16, "cpu", torch.float32, cfg) for _ in model.blocks]
    decoder = kv.DecodeModel(model, torch.float32)
    with torch.no_grad():
        for t in range(steps):
            logits = decoder.decode_step(tokens[:, t], torch.full((2,), t), caches)
        fresh = model.forward_logits(tokens[:, steps - context:])[:, -1]
    assert caches[0].lengths.tolist() == [context, context]
    tol = 1e-4 if backend == "bf16" else 0.15
    torch.testing.assert_close(logits, fresh, rtol=0, atol=tol)


def test_isolation_check_on_a_tiny_cpu_model(sample_shards, tmp_path):
    """A fresh process scores the artifact as this one does, decodes what a full forward decodes, writes its
    report beside the artifact (not into the working folder), and refuses a damaged artifact."""
    import sentencepiece as spm

    args, model = tiny_model(2)
    (tmp_path / "run").mkdir()
    artifact = tmp_path / "run" / "final_model.polar.ptz"
    stats = tg.export_artifact(model.state_dict(), args.codec_settings("polar"), args.model_config(), "zlib", artifact)
    cmd = [sys.executable, str(ROOT / "artifact_isolation_check.py"), str(artifact), "--data-path", str(sample_shards),
           "--tokenizer", str(TOKENIZER), "--val-tokens", "512", "--seq-len", "64", "--steps", "24", "--generate", "8",
           "--prompt", "The river"]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    r = json.loads((tmp_path / "run" / "final_model.polar.ptz.isolation.json").read_text())

    state, _ = tg.load_artifact(artifact)
    model.load_state_dict(state)
    args.data_path, args.train_seq_len, args.val_max_tokens = str(sample_shards), 64, 512
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    val = tg.load_validation_tokens(args)
    here = tg.eval_teacher_forced(args, model, tg.Dist(), val, tg.ByteLUTs.build(sp, torch.device("cpu")), 8)
    assert r["state_hash"] == stats["state_hash"] and r["val_tokens"] == 512
    assert r["val_loss"] == pytest.approx(here[0], abs=1e-6) and r["val_bpb"] == pytest.approx(here[1], abs=1e-6)
    ids = [1] + sp.encode("The river")
    with torch.no_grad():
        for _ in range(8):  # greedy, by a full forward over the prefix: not the KV-cache path the check takes
            ids.append(int(model.forward_logits(torch.tensor([ids]))[0, -1].argmax()))
    assert r["continuation"] == sp.decode(ids[-8:])
    assert r["steady_state_allocated_growth_bytes"] == 0 and r["cache_tensor_bytes"] > 0

    blob = artifact.read_bytes()
    artifact.write_bytes(blob[:100] + bytes([blob[100] ^ 1]) + blob[101:])
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode != 0 and "fails its sha256 checksum" in p.stderr


@pytest.mark.parametrize("layers", [1, 2, 5])
def test_decode_matches_the_full_forward_at_every_position(layers):
    """decode_hidden's fused residual stream (the U-Net skips included) against forward_logits."""
    args, model = tiny_model(3, layers)
    tokens = torch.randint(0, 1024, (2, 12))
    caches = [kv.make_kv_cache("bf16", 2, 2, 4, 16, 16, "cpu", torch.float32) for _ in model.blocks]
    decoder = kv.DecodeModel(model, torch.float32)
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
    for got, want in zip(kv.residual_norm_triton(x, **kwargs), kv.residual_norm_reference(x, **kwargs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, n, k, relu_square", [(1, 96, 64, False), (3, 10, 1100, True)])
def test_small_batch_linear_kernel_matches_reference(rows, n, k, relu_square):
    torch.manual_seed(0)
    x, w = torch.randn(rows, k), torch.randn(n, k) / 30
    want = F.linear(x, w)
    want = kv.relu_square_reference(want) if relu_square else want
    torch.testing.assert_close(kv.small_batch_linear_triton(x, w, relu_square), want, rtol=1e-5, atol=1e-5)


def test_relu_square_kernel_matches_reference():
    x = torch.randn(3, 1500)  # not a multiple of the block
    torch.testing.assert_close(kv.relu_square_triton(x), kv.relu_square_reference(x))


def test_score_next_token_kernel_matches_reference():
    rows = torch.randint(0, 1000, (5, 9))
    proj = torch.randn(5, 1000) * 40
    window = torch.tensor([[0, 9], [6, 9], [0, 0], [0, 8], [0, 8]])  # row 1 in its warmup, row 4 past its end
    positions = {name: torch.tensor([5, 5, -(1 << 62), 7, 8]) for name in ("kernel", "torch")}
    loss = {name: torch.full((5,), 2.0, dtype=torch.float64) for name in positions}
    for name, score in (("kernel", kv.score_next_token_triton), ("torch", kv.score_next_token_reference)):
        score(proj, rows, positions[name], window, loss[name], 30.0)
    torch.testing.assert_close(loss["kernel"], loss["torch"], rtol=1e-5, atol=1e-5)
    nll = kv.next_token_nll_reference(proj, rows[torch.arange(5), torch.tensor([6, 6, 0, 8, 8])], 30.0).double()
    torch.testing.assert_close(loss["kernel"], torch.tensor([2 + nll[0], 2, 2, 2 + nll[3], 2], dtype=torch.float64))
    assert positions["kernel"].tolist() == positions["torch"].tolist() == [6, 6, -(1 << 62) + 1, 8, 9]


def test_fused_decoder_matches_the_torch_path(sample_shards, monkeypatch):
    """The whole fused step (residual / scoring kernels, int8_triton prologue + attention, under the
    interpreter) scores as the torch references do, padded rows included, and the kernels did run. (The
    small-batch linear kernel has its own test: under the interpreter it would take minutes here.)"""
    import sentencepiece as spm

    args, model = tiny_model(4, layers=2)
    args.data_path, args.val_max_tokens, args.kv_eval_batch = str(sample_shards), 48 * 3, 4
    val = tg.load_validation_tokens(args)
    luts = tg.ByteLUTs.build(spm.SentencePieceProcessor(model_file=str(TOKENIZER)), torch.device("cpu"))
    plan = kv.window_plan(val, args.train_seq_len)
    torch_path = kv.autoregressive_eval(args.ar_eval_settings(), model, plan, luts, "int8", torch.device("cpu"), print)
    teacher_forced = tg.eval_teacher_forced(args, model, tg.Dist(), val, luts, 3)[1]
    launches = {}
    for name in ("residual_norm_triton", "score_next_token_triton", "relu_square_triton"):
        def counted(*a, _kernel=getattr(kv, name), _name=name, **k):
            launches[_name] = launches.get(_name, 0) + 1
            return _kernel(*a, **k)
        monkeypatch.setattr(kv, name, counted)
    monkeypatch.setattr(kv, "use_decode_kernels", lambda device: True)
    monkeypatch.setattr(kv, "SMALL_BATCH_ROWS", 0)
    settings, cpu = args.ar_eval_settings(), torch.device("cpu")
    fused = kv.autoregressive_eval(settings, model, plan, luts, "int8_triton", cpu, print)
    steps = 48  # one batch of 3 windows (padded to 4), 48 decode steps
    assert launches == {"residual_norm_triton": steps * (2 * 2 + 1), "score_next_token_triton": steps,
                        "relu_square_triton": steps * 2}
    assert fused["tokens"] == torch_path["tokens"] == 144
    assert abs(fused["val_bpb"] - torch_path["val_bpb"]) < 1e-4  # same codes; the kernels sum in another order
    exact = kv.autoregressive_eval(settings, model, plan, luts, kv.exact_backend(cpu), cpu, print)
    assert exact["backend"] == "bf16_triton" and abs(exact["val_bpb"] - teacher_forced) < 1e-5


def luts_cpu():
    import sentencepiece as spm

    return tg.ByteLUTs.build(spm.SentencePieceProcessor(model_file=str(TOKENIZER)), torch.device("cpu"))


def brute_force_bpb(model, tokens, luts, context_start) -> float:
    """Each target t scored by a fresh forward over tokens[context_start(t):t]."""
    nll = 0.0
    with torch.no_grad():
        for t in range(1, tokens.numel()):
            logits = model.forward_logits(tokens[None, context_start(t):t])[0, -1]
            nll += float(F.cross_entropy(logits[None], tokens[t:t + 1]))
    nbytes = float(luts.count(tokens[:-1], tokens[1:]).sum())
    return kv.bpb(nll, tokens.numel() - 1, nbytes)[1]


RING_SHAPES = [(1, 8), (3, 16), (4, 5), (7, 12)]  # (rows B, ring entries C); 101 targets: no B divides them


@pytest.mark.parametrize("batch, context", RING_SHAPES)
def test_ring_eval_scores_each_token_with_a_full_window_one_layer(batch, context):
    """One layer: a token's cached K/V depend on itself alone, so the ring scores exactly what a fresh forward
    over each target's previous min(position, C - 1) tokens (and its input) scores."""
    args, model = tiny_model(5, layers=1)
    tokens, luts = torch.randint(0, 1024, (102,)), luts_cpu()
    args.kv_eval_batch = batch
    plan = kv.ring_plan(tokens, batch, context)
    ring = kv.autoregressive_eval(args.ar_eval_settings(), model, plan, luts, "bf16", torch.device("cpu"), print)
    assert ring["tokens"] == 101 and plan.scored_bytes(luts) == float(luts.count(tokens[:-1], tokens[1:]).sum())
    want = brute_force_bpb(model, tokens, luts, lambda t: max(0, t - context))
    assert abs(ring["val_bpb"] - want) < 1e-5, (ring["val_bpb"], want)


@pytest.mark.parametrize("batch, context", RING_SHAPES)
def test_ring_eval_is_sliding_window_attention_over_each_row(batch, context, monkeypatch):
    """Three layers: a ring cache holds each layer's K/V as computed when that token was decoded, so a deeper
    layer sees past the window through the layers below (sliding-window attention, as any bounded KV cache
    decodes), from its row's start on. The brute force: a fresh forward from the row's start, every layer
    attending over its last C positions."""
    args, model = tiny_model(6, layers=3)
    tokens, luts = torch.randint(0, 1024, (102,)), luts_cpu()
    args.kv_eval_batch = min(batch, 2)  # two decode batches where B > 2
    ring = kv.autoregressive_eval(args.ar_eval_settings(), model, kv.ring_plan(tokens, batch, context), luts, "bf16",
                                  torch.device("cpu"), print)
    sdpa = F.scaled_dot_product_attention

    def banded(q, k, v, is_causal, enable_gqa):
        i = torch.arange(q.shape[-2])
        keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < context)
        return sdpa(q, k, v, attn_mask=keep, enable_gqa=enable_gqa)

    monkeypatch.setattr(F, "scaled_dot_product_attention", banded)
    n = tokens.numel() - 1

    def row_start(t):  # target t (input t - 1) lies in span b of the n targets cut into B spans
        span = next(b for b in range(batch) if n * b // batch <= t - 1 < n * (b + 1) // batch)
        return max(0, n * span // batch - (context - 1))

    want = brute_force_bpb(model, tokens, luts, row_start)
    assert abs(ring["val_bpb"] - want) < 1e-5, (ring["val_bpb"], want)


@pytest.mark.parametrize("stride, seq", [(1, 16), (5, 16), (16, 16), (7, 48)])
def test_sliding_window_reference_matches_its_definition(stride, seq):
    """Windows of `seq` tokens every `stride`: target t is scored by the first window that reaches it, with
    that window's start as its context start."""
    args, model = tiny_model(7, layers=2)
    args.train_seq_len = seq
    tokens, luts = torch.randint(0, 1024, (102,)), luts_cpu()
    got = tg.eval_sliding_window(args, model, tg.Dist(), tokens, luts, stride, 3)[1]

    def window_start(t):
        k = 0 if t <= seq else -(-(t - seq) // stride)
        return max(0, min(seq + k * stride, 101) - seq)

    assert abs(got - brute_force_bpb(model, tokens, luts, window_start)) < 1e-5
    if stride == seq:  # non-overlapping windows: the plain eval over the same whole windows
        whole = tokens[:101 // seq * seq + 1]
        assert abs(tg.eval_sliding_window(args, model, tg.Dist(), whole, luts, stride, 3)[1]
                   - tg.eval_teacher_forced(args, model, tg.Dist(), whole, luts, 3)[1]) < 1e-6


def test_ar_eval_reports_progress_within_one_batch(monkeypatch):
    args, model = tiny_model(8, layers=1)
    monkeypatch.setattr(kv, "PROGRESS_SECONDS", 0.0)
    lines = []
    plan = kv.ring_plan(torch.randint(0, 1024, (41,)), 4, 8)
    kv.autoregressive_eval(args.ar_eval_settings(), model, plan, luts_cpu(), "bf16", torch.device("cpu"), lines.append)
    assert len(lines) == 17 and lines[-1].startswith("ar_eval_progress backend:bf16 mode:ring scored:40/40 decoded:61/61")


def test_ring_deltas_yield_each_row_as_it_is_measured(monkeypatch):
    """benchmark_decode.py's ring_deltas (kv_sensitivity.py's too), whose rows a cut run keeps: the exact backend's
    row comes first, before any other backend runs, with delta 0; then each backend's, as the AR eval scores it
    alone, with its delta vs exact."""
    decode = load_benchmark("benchmark_decode", monkeypatch)
    args, model = tiny_model(7, layers=1)
    tokens, luts, cpu = torch.randint(0, 1024, (66,)), luts_cpu(), torch.device("cpu")
    scored = []
    evaluate = kv.autoregressive_eval
    monkeypatch.setattr(kv, "autoregressive_eval", lambda *a, **k: scored.append(a[4]) or evaluate(*a, **k))
    rows = decode.ring_deltas(args, model, tokens, luts, ["int8"], 64, cpu)
    exact = next(rows)
    assert scored == [kv.exact_backend(cpu)] and exact["backend"] == scored[0] and exact["delta_vs_exact"] == 0.0
    (int8,) = list(rows)
    alone = evaluate(args.ar_eval_settings(), model, kv.ring_plan(tokens[:65], args.kv_eval_batch, args.train_seq_len),
                     luts, "int8", cpu, print)
    assert int8["backend"] == "int8" and int8["val_bpb"] == alone["val_bpb"] != exact["val_bpb"]
    assert int8["delta_vs_exact"] == int8["val_bpb"] - exact["val_bpb"]


def test_rotated_values_fold_into_the_output_projection():
    """tq4_triton leaves attention in its layer's rotated basis (attend_in_basis) and the decoder folds that rotation
    into each layer's output projection: the same logits as the torch tq4 path, which rotates every output back."""
    torch.manual_seed(5)
    args = tg.Hyperparameters(num_layers=2, model_dim=128, num_heads=2, num_kv_heads=1, train_seq_len=32)
    model = tg.build_model(args.model_config(), torch.device("cpu")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokens = torch.randint(0, 1024, (2, 10))
    decoder = kv.DecodeModel(model, torch.float32)
    logits = {}
    for name in ("tq4", "tq4_triton"):
        caches = [kv.make_kv_cache(name, 2, 1, 2, 64, 64, "cpu", torch.float32, layer=i) for i in range(2)]
        with torch.no_grad():
            logits[name] = torch.stack([decoder.decode_step(tokens[:, t], torch.full((2,), t), caches)
                                        for t in range(10)], 1)
        q = torch.randn(2, 2, 64)
        basis = caches[1].output_basis
        if name == "tq4_triton":
            assert basis is not None
            torch.testing.assert_close(caches[1].attend_in_basis(q) @ basis.T, caches[1].attend(q), rtol=0, atol=1e-5)
        else:
            assert basis is None
    folded = decoder.output_projections(caches)
    assert not torch.equal(folded[0], model.blocks[0].attn.proj.weight)  # the rotation is folded in
    torch.testing.assert_close(logits["tq4_triton"], logits["tq4"], rtol=0, atol=2e-3)
