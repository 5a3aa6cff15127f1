"""Weight codecs, QAT straight-through, and the artifact (format, checksum, fresh-process reload)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import ROOT


def trained_like(rows, cols, seed=0):
    """Heavy-tailed rows with uneven scales, like trained transformer matrices."""
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((rows, cols)) * 0.02
    return w * torch.rand(rows, 1, generator=g).add(0.5) * torch.linspace(0.5, 1.5, cols)


def rel_mse(codec, w):
    codes, radius = codec.encode_codes(w)
    return float(((codec.decode_codes(codes, radius, w.shape[1]) - w) ** 2).sum() / (w ** 2).sum())


def test_polar_error_falls_with_bits_and_beats_uniform_grids():
    w = trained_like(64, 512)
    errors = [rel_mse(tg.PolarRowCodec((b,), 7), w) for b in (2, 3, 4, 5, 6)]
    assert all(a > 2.5 * b for a, b in zip(errors, errors[1:], strict=False)), errors
    for bits in ((4, 3, 3, 3, 4), (5, 4, 4, 4, 5)):
        ours = rel_mse(tg.PolarRowCodec(bits, 7), w)
        uniform = rel_mse(tg.PolarRowCodec(bits, 7, codebook=tg.uniform_codebook, rotate=False), w)
        assert ours < 0.75 * uniform, (bits, ours, uniform)  # measured: 0.68x and 0.70x


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_is_lossless(bits):
    codes = torch.randint(0, 2 ** bits, (1001,), dtype=torch.uint8)
    packed = tg.pack_bits(codes, bits)
    assert packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(tg.unpack_bits(packed, bits, 1001), codes)


def test_straight_through_estimator_passes_gradients_unchanged():
    lin = tg.CastedLinear(64, 32, bias=False)
    x = torch.randn(5, 64)
    lin.qat_delta = torch.zeros_like(lin.weight)
    tg.Int8RowCodec().fake_quant_(lin.weight, lin.qat_delta)
    assert lin.qat_delta.abs().max() > 0
    lin(x).square().sum().backward()
    wq = (lin.weight + lin.qat_delta).detach().requires_grad_()
    torch.nn.functional.linear(x, wq).square().sum().backward()
    assert torch.equal(lin.weight.grad, wq.grad)


@pytest.mark.parametrize("rows, cols", [(3, 512), (2, 1024), (2, 384)])
def test_polar_triton_kernel_matches_torch_reference(rows, cols):
    codec = tg.PolarRowCodec((4, 3, 3, 3, 4), 11)
    w = trained_like(rows, cols, seed=cols)
    d = 1 << (cols - 1).bit_length()
    out, codes, radius = torch.empty_like(w), torch.empty(rows, d - 1, dtype=torch.uint8), torch.empty(rows, dtype=torch.float16)
    tg.polar_fake_quant_triton(codec, w, out, codes, radius)
    ref_codes, ref_radius = codec.encode_codes(w)
    assert torch.equal(radius, ref_radius)
    assert torch.equal(codes, torch.cat(ref_codes, dim=1))
    ref = codec.decode_codes(ref_codes, ref_radius, cols) - w
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def small_state():
    args = tg.Hyperparameters(num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2, vocab_size=1024,
                              weight_quant_scheme="polar")
    model = tg.build_model(args.model_config(), torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return args, model


@pytest.mark.parametrize("scheme, compressor", [("polar", "zlib"), ("int8", "zlib"), ("polar", "lzma")])
def test_export_reload_in_a_fresh_process_is_bit_identical(tmp_path, scheme, compressor):
    args, model = small_state()
    args.weight_quant_scheme, args.compressor = scheme, compressor
    path = tmp_path / "m.ptz"
    stats = tg.export_artifact(model.state_dict(), args, path)
    assert not list(tmp_path.glob("*.tmp"))
    here, _ = tg.load_artifact(path)
    dump = tmp_path / "fresh.pt"
    code = ("import sys, torch; sys.path.insert(0, sys.argv[3]); import train_gpt as tg; "
            "s, m = tg.load_artifact(sys.argv[1]); assert tg.state_hash(s) == m['state_hash']; torch.save(s, sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(path), str(dump), str(ROOT)], check=True)
    fresh = torch.load(dump)
    assert stats["state_hash"] == tg.state_hash(fresh) and all(torch.equal(here[k], fresh[k]) for k in here)
    model.load_state_dict(here)
    other = tg.build_model(args.model_config(), torch.device("cpu"))
    other.load_state_dict(fresh)
    x = torch.randint(0, 1024, (2, 32))
    assert torch.equal(model.forward_logits(x), other.forward_logits(x))


def test_polar_qat_delta_reproduces_the_export():
    args, model = small_state()
    args.qat_scheme = "polar"
    qat = tg.QAT(model, args)
    qat.active = True
    qat.refresh()
    state = tg.dequantize_state(tg.quantize_state(model.state_dict(), args), args)
    for name, p in model.named_parameters():
        if tg.is_quantized_tensor(name, p):
            delta = model.emb_qat_delta if name == "tok_emb.weight" else model.get_submodule(name[:-7]).qat_delta
            torch.testing.assert_close(p + delta, state[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-100], "truncated"),
    (lambda b: b[:20], "shorter than its header"),
    (lambda b: b[:60] + bytes([b[60] ^ 1]) + b[61:], "checksum"),
    (lambda b: b"NOTGOLF!" + b[8:], "not a parameter-golf artifact"),
    (lambda b: b[:8] + (99).to_bytes(4, "little") + b[12:], "format version 99"),
])
def test_damaged_artifacts_are_rejected(tmp_path, damage, message):
    args, model = small_state()
    path = tmp_path / "m.ptz"
    tg.export_artifact(model.state_dict(), args, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        tg.load_artifact(path)


def test_polar_packs_fewer_bits_than_int8():
    codec = tg.PolarRowCodec((4, 3, 3, 3, 4), 0)
    assert codec.bits_per_weight(1024, 512) == pytest.approx((256 * 4 + 128 * 3 + 64 * 3 + 32 * 3 + 31 * 4 + 16) / 512)
    assert codec.bits_per_weight(1024, 512) < 3.6
    lloyd = tg.angle_codebook(5, 3)
    assert np.all(np.diff(lloyd) > 0) and abs(lloyd.mean() - np.pi / 4) < 1e-3 and lloyd.max() - lloyd.min() < 0.6
