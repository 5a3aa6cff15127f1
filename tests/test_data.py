import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import ROOT, SAMPLE, TOKENIZER, load_benchmark, tiny_env
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


def test_run_sh_sample_rebuilds_a_missing_train_shard(tmp_path):
    """run.sh sample rebuilds its shards when either split is missing, not only the validation one."""
    from data.build_shards import build

    data = tmp_path / "sample_sp1024"
    build([SAMPLE / "fineweb_edu_sample.txt"], "file", TOKENIZER, data, 0.15, 100_000_000)
    (data / "fineweb_train_000000.bin").unlink()
    env = tiny_env(data, tmp_path / "out", ITERATIONS=2, KV_EVAL_MAX_TOKENS=64, QAT_SCHEME="none",
                   WEIGHT_QUANT_SCHEME="int8", KV_EVAL_COMPARE_BACKENDS="", DATA_PATH_SAMPLE=data)
    p = subprocess.run(["bash", str(ROOT / "run.sh"), "sample"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"wrote {data}" in p.stdout and (data / "fineweb_train_000000.bin").is_file()
    assert "final_int8_zlib_roundtrip" in p.stdout


def write_docs(path, docs, kind):
    import gzip
    import json
    import lzma

    if kind == "txt":
        path.write_text("\n".join(docs) + "\n", encoding="utf-8")
        return
    text = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs))
    opener = {"jsonl": open, "jsonl.gz": gzip.open, "jsonl.xz": lzma.open}[kind]
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


@pytest.fixture(scope="module")
def sample_docs():
    lines = [d for d in (SAMPLE / "fineweb_tiny.txt").read_text(encoding="utf-8").splitlines() if d.strip()]
    assert len(lines) == 10
    return lines


def test_jsonl_plain_and_compressed_give_the_text_path_shards(tmp_path, sample_docs):
    from data.build_shards import build

    shards = {}
    for kind, workers in (("txt", 1), ("jsonl", 1), ("jsonl.gz", 2), ("jsonl.xz", 2)):
        halves = [tmp_path / f"a.{kind}", tmp_path / f"b.{kind}"]
        write_docs(halves[0], sample_docs[:6], kind)
        write_docs(halves[1], sample_docs[6:], kind)
        stats = build(halves, "auto", TOKENIZER, tmp_path / kind, None, 3000, val_tokens=2000, workers=workers)
        shards[kind] = shard_bytes(tmp_path / kind)
    assert len(shards["txt"]) >= 3 and all(s == shards["txt"] for s in shards.values())
    val = tg.read_shard(tmp_path / "txt" / "fineweb_val_000000.bin")
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    tail = [[1] + ids for ids in sp.encode(sample_docs[-stats["val_documents"]:])]
    assert val.tolist() == [t for ids in tail for t in ids] and len(val) >= 2000  # whole documents, nothing else
    assert len(val) - len(tail[0]) < 2000  # the last document start that leaves 2,000 tokens


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"}\n{"text": broken}\n', "bad.jsonl:2: not a JSON object"),
    ('{"text": "ok"}\n{"title": "no text"}\n', 'bad.jsonl:2: no string "text" field'),
    ('{"text": 7}\n', 'bad.jsonl:1: no string "text" field'),
    ('{"text": "ok"}\n\n', "bad.jsonl:2: not a JSON object"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
    from data.build_shards import build

    (tmp_path / "bad.jsonl").write_text(line, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        build([tmp_path / "bad.jsonl"], "auto", TOKENIZER, tmp_path / "out", 0.5, 1000)
    p = subprocess.run([sys.executable, "data/build_shards.py", "--input", str(tmp_path / "bad.jsonl"), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr


def test_standin_protocol_appends_a_row(tmp_path, sample_docs):
    """The protocol end to end on a tiny corpus of the stand-in's shape (four enwiki_*.jsonl.xz files), its paths
    relative to the caller's directory (the trainer runs in --code-dir)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        write_docs(corpus / f"enwiki_0{i}.jsonl.xz", sample_docs[i::4], "jsonl.xz")
    results = tmp_path / "results.md"
    tiny = {k: v for k, v in tiny_env(tmp_path, tmp_path).items() if k in (
        "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "TRAIN_SEQ_LEN", "TRAIN_BATCH_TOKENS", "WARMUP_STEPS",
        "WARMDOWN_ITERS", "KV_QUANT_BACKEND", "KV_EVAL_MAX_TOKENS", "KV_EVAL_BATCH")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "standin_protocol.py"), "--config", "int8", "int5r", "--corpus",
           "corpus", "--data", "data", "--val-tokens", "1500", "--seconds", "30", "--out-dir", "runs", "--code-dir",
           os.path.relpath(ROOT, tmp_path), "--results", str(results), "--commit", "abc1234", "--set", "ITERATIONS=3",
           "MODEL_DIM=128", *(f"{k}={v}" for k, v in tiny.items() if k != "MODEL_DIM")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = [line for line in results.read_text().splitlines() if "| abc1234 |" in line]
    assert len(rows) == 2 and "| int8 |" in rows[0] and "| int5r |" in rows[1] and "INT_ROTATE=1" in rows[1]
    summary = json.loads(next((tmp_path / "runs").glob("int5r_*/logs/*.json")).read_text())
    cells = [c.strip() for c in rows[1].split("|")]
    assert cells[7] == "3" and cells[10] == f"{summary['roundtrip_val_bpb']:.5f}" and cells[11] == f"{summary['model_bytes']:,}"


def test_standin_protocol_run_id_names_one_run(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "standin_protocol.py"), "--config", "int8", "int5r", "--run-id",
           "mine", "--corpus", str(tmp_path), "--out-dir", str(tmp_path / "runs")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and "--run-id names one run" in p.stderr and not (tmp_path / "runs").exists()


def test_standin_protocol_refuses_a_code_dir_without_the_trainer(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "standin_protocol.py"), "--config", "int8",
           "--code-dir", "records", "--corpus", str(tmp_path), "--out-dir", "runs"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and f"--code-dir {tmp_path / 'records'} holds no train_gpt.py" in p.stderr
    assert not (tmp_path / "runs").exists()


def git_in(repo, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_standin_rows_name_a_dirty_tree(tmp_path, monkeypatch):
    """A row run from uncommitted changes to tracked files says so: its commit alone would not reproduce it."""
    protocol = load_benchmark("standin_protocol", monkeypatch)
    assert protocol.code_commit(tmp_path) == "uncommitted"
    git = functools.partial(git_in, tmp_path)
    git("init", "-q")
    (tmp_path / "train_gpt.py").write_text("a = 1\n")
    git("add", "train_gpt.py")
    git("commit", "-qm", "one")
    head = git("rev-parse", "--short", "HEAD")
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert protocol.code_commit(tmp_path) == head
    (tmp_path / "train_gpt.py").write_text("a = 2\n")
    assert protocol.code_commit(tmp_path) == head + "-dirty"


def test_standin_rows_name_the_commit_of_an_archived_tree(tmp_path, monkeypatch):
    """A version staged by `git archive` inside the checkout (device_run.sh's REVS) is named by its own commit, not
    by the checkout's HEAD around it; a tree copied by other means names none."""
    protocol = load_benchmark("standin_protocol", monkeypatch)
    repo = tmp_path / "repo"
    git = functools.partial(git_in, repo)
    (repo / "benchmarks").mkdir(parents=True)
    for name in ("commit.txt", ".gitattributes"):
        shutil.copy(ROOT / "benchmarks" / name, repo / "benchmarks" / name)
    (repo / "train_gpt.py").write_text("a = 1\n")
    (repo / ".gitignore").write_text("/.device/\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "staged version")
    staged = git("rev-parse", "--short", "HEAD")
    version = repo / ".device" / "rev" / "a"
    version.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=repo, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(version)], input=archive, check=True)
    (repo / "train_gpt.py").write_text("a = 2\n")
    git("commit", "-qam", "the checkout moves on")
    assert protocol.code_commit(version) == staged != git("rev-parse", "--short", "HEAD")
    copied = tmp_path / "copied"
    shutil.copytree(repo, copied, ignore=shutil.ignore_patterns(".git", ".device"))
    assert protocol.code_commit(copied) == "uncommitted"
