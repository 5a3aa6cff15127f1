import pytest

import train_gpt as tg


@pytest.mark.parametrize("env, message", [
    ({"NUM_LAYERS": "nine"}, "NUM_LAYERS='nine' is not a valid int"),
    ({"NUM_LAYERS": "0"}, "NUM_LAYERS=0: must be positive"),
    ({"QAT_SCHEME": "int4"}, "QAT_SCHEME='int4': must be one of none, int8, int, polar"),
    ({"WEIGHT_QUANT_SCHEME": "fp8"}, "WEIGHT_QUANT_SCHEME='fp8': must be one of int8, int, polar"),
    ({"INT_BITS": "9"}, "INT_BITS=9: must be in 2..8"),
    ({"INT_EMBED_BITS": "1"}, "INT_EMBED_BITS=1: must be in 2..8"),
    ({"CODEC_COMPARE": "int8 int:9:8"}, "CODEC_COMPARE='int8 int:9:8'"),
    ({"POLAR_BITS": "4,9"}, "POLAR_BITS='4,9': must be comma-separated bits"),
    ({"POLAR_BITS": "a"}, "POLAR_BITS='a'"),
    ({"KV_QUANT_BACKEND": "fp4"}, "KV_QUANT_BACKEND: KV backend 'fp4' is unknown; valid backends: auto"),
    ({"KV_EVAL_COMPARE_BACKENDS": "int8,nope"}, "KV_EVAL_COMPARE_BACKENDS: KV backend 'nope' is unknown"),
    ({"KV_EVAL_COMPARE_BACKENDS": "auto"}, "KV_EVAL_COMPARE_BACKENDS: KV backend 'auto' is unknown"),
    ({"STRICT_WALLCLOCK": "maybe"}, "STRICT_WALLCLOCK='maybe' is not a valid bool"),
    ({"MODEL_DIM": "500"}, "NUM_HEADS=8: must divide MODEL_DIM=500"),
    ({"NUM_HEADS": "3"}, "NUM_HEADS=3: must divide MODEL_DIM=512"),
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS=3: must divide NUM_HEADS=8"),
    ({"QAT_START_FRAC": "1.5"}, "must be in [0, 1]"),
    ({"KV_VALUE_BITS": "3"}, "must be 4 or 8"),
    ({"KV_RECENT_EXACT_TOKENS": "-1"}, "KV_RECENT_EXACT_TOKENS='-1': must be auto (each backend's own ring) or a count"),
    ({"POLAR_KIND_BITS": "mlp.fc=4/mlp.fc=5"}, "names a matrix kind twice"),
])
def test_invalid_env_values_are_rejected(env, message):
    with pytest.raises(ValueError) as e:
        tg.Hyperparameters.from_env(env)
    assert message in str(e.value)


def test_defaults_match_the_baseline():
    a = tg.Hyperparameters.from_env({})
    assert (a.vocab_size, a.num_layers, a.model_dim, a.num_heads, a.num_kv_heads, a.mlp_mult) == (1024, 9, 512, 8, 4, 2)
    assert (a.train_batch_tokens, a.train_seq_len, a.max_wallclock_seconds) == (524_288, 1024, 600.0)
    assert (a.matrix_lr, a.scalar_lr, a.tied_embed_lr, a.logit_softcap, a.qk_gain_init) == (0.04, 0.04, 0.05, 30.0, 1.5)
    a = tg.Hyperparameters.from_env({"NUM_LAYERS": "11", "TIE_EMBEDDINGS": "false", "QAT_START_FRAC": "0.25"})
    assert (a.num_layers, a.tie_embeddings, a.qat_start_frac) == (11, False, 0.25)
