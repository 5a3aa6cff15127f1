import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import SAMPLE, TOKENIZER
from data.build_shards import write_shard


def test_shard_roundtrip(tmp_path):
    tokens = np.arange(1000, dtype=np.int64) % 1024
    write_shard(tmp_path / "s.bin", tokens)
    assert np.array_equal(tg.read_shard(tmp_path / "s.bin"), tokens)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b""), "less than its 1024-byte header"),
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated or corrupt"),
    (lambda p: p.write_bytes(np.int32(7).tobytes() + p.read_bytes()[4:]), "magic 7"),
    (lambda p: p.write_bytes(p.read_bytes()[:4] + np.int32(2).tobytes() + p.read_bytes()[8:]), "version 2"),
])
def test_bad_shards_are_rejected_with_the_fix(tmp_path, damage, message):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.arange(100))
    damage(path)
    with pytest.raises(ValueError) as e:
        tg.read_shard(path)
    assert message in str(e.value) and str(path) in str(e.value) and "build_shards.py" in str(e.value)


def test_missing_shards_name_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards match"):
        tg.shard_paths(str(tmp_path / "fineweb_val_*.bin"))


def test_tokenizer_mismatch_is_caught(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.full(300, 2000))
    args = tg.Hyperparameters(data_path=str(tmp_path), train_seq_len=64)
    with pytest.raises(ValueError, match="another tokenizer"):
        tg.load_validation_tokens(args)
    with pytest.raises(ValueError, match="VOCAB_SIZE=512"):
        tg.load_tokenizer(tg.Hyperparameters(tokenizer_path=str(TOKENIZER), vocab_size=512))


def test_byte_count_matches_utf8_of_real_text():
    """Documents with BOS in front, as in the shards: the count is the UTF-8 length of the decoded text."""
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    luts = tg.ByteLUTs.build(sp, torch.device("cpu"))
    docs = [d for d in (SAMPLE / "fineweb_edu_sample.txt").read_text(encoding="utf-8").splitlines() if d.strip()]
    docs = docs[:400] + ["Caf\u00e9 na\u00efve \u201cquoted\u201d \u2014 ok.  Two  spaces\tand a tab"]
    clean = [ids for ids in sp.encode(docs) if sp.unk_id() not in ids]  # this tokenizer has no byte pieces
    assert len(clean) >= 300 and any(len(sp.id_to_piece(i).encode()) > len(sp.id_to_piece(i)) for ids in clean for i in ids)
    stream = torch.tensor([t for ids in clean for t in [1] + ids])
    counted = int(luts.count(stream[:-1], stream[1:]).sum())
    assert counted == sum(len(sp.decode(ids).encode("utf-8")) for ids in clean) > 90_000


def test_unknown_and_control_tokens_count_zero_bytes():
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    luts = tg.ByteLUTs.build(sp, torch.device("cpu"))
    word = sp.piece_to_id("\u2581the")
    prev = torch.tensor([sp.unk_id(), 1, word, word])
    tgt = torch.tensor([word, word, sp.unk_id(), word])
    # after <unk> or BOS (boundaries) the leading space is not counted; <unk> itself is 0 bytes
    assert luts.count(prev, tgt).tolist() == [3, 3, 0, 4]


def test_loader_gives_each_rank_its_span(sample_shards):
    d0, d1 = tg.Dist(0, 2), tg.Dist(1, 2)
    single = tg.DistributedTokenLoader(str(sample_shards / "fineweb_train_*.bin"), tg.Dist())
    a = tg.DistributedTokenLoader(str(sample_shards / "fineweb_train_*.bin"), d0).next_batch(128, 64)[0]
    b = tg.DistributedTokenLoader(str(sample_shards / "fineweb_train_*.bin"), d1).next_batch(128, 64)[0]
    first = single.next_batch(128, 64)[0]
    second = single.next_batch(128, 64)[0]
    assert torch.equal(a, first) and torch.equal(b, second)
