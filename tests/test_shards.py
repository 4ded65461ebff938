"""Corpora and packed shards: generated corpus, readers, shard layout, deterministic rank-split batches."""

import json

import numpy as np
import pytest
import torch

from conftest import require_module
from nanoseek.data.chat import EOS, THINK
from nanoseek.data.corpus import builtin_corpus, read_corpus
from nanoseek.data.shards import PackedDataset, tokenize_to_shards
from nanoseek.data.tasks import TASKS, get_task
from nanoseek.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(builtin_corpus(300, seed=2), vocab_size=350)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("shards")
    tokenize_to_shards(builtin_corpus(200, seed=0), tok, d, shard_tokens=1000, batch_docs=64, progress=False)
    return d


def test_builtin_corpus_is_deterministic_and_holds_no_test_problems():
    docs = list(builtin_corpus(400, seed=0))
    assert docs == list(builtin_corpus(400, seed=0)) and docs != list(builtin_corpus(400, seed=1))
    transcripts = [d for d in docs if THINK in d]
    assert 150 < len(transcripts) < 350 and len(docs) - len(transcripts) > 50
    test_prompts = {e.prompt for name in TASKS for d in (1, 2) for e in get_task(name).examples("test", 500, difficulty=d)}
    prompts = {d.split("<｜User｜>")[1].split("<｜Assistant｜>")[0] for d in transcripts}
    assert len(prompts) > 100 and not prompts & test_prompts
    assert all("</think>" in d and not d.endswith(EOS) for d in transcripts)


def test_read_corpus_formats(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth"}\n')
    (tmp_path / "skip.bin").write_text("ignored")
    assert list(read_corpus(tmp_path)) == ["first", "second", "third", "fourth"]
    assert list(read_corpus(tmp_path / "b.txt")) == ["second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        list(read_corpus(bad))
    with pytest.raises(FileNotFoundError):
        list(read_corpus(tmp_path / "missing"))


def test_read_parquet(tmp_path):
    pa = require_module("pyarrow", "pip install 'nanoseek[data]' (or pyarrow)")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x", None, "y"], "id": [1, 2, 3]}), tmp_path / "d.parquet")
    assert list(read_corpus(tmp_path / "d.parquet")) == ["x", "y"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        list(read_corpus(tmp_path / "e.parquet"))


def test_shard_layout(shard_dir, tok):
    index = json.loads((shard_dir / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["n_docs"] == 200 and len(index["shards"]) > 2
    stream = np.concatenate([np.fromfile(shard_dir / s["file"], dtype=np.uint16) for s in index["shards"]])
    expected = [t for d in builtin_corpus(200, seed=0) for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]
    assert stream.tolist() == expected and index["total_tokens"] == len(expected)


def test_batches_are_pure_and_shifted(shard_dir):
    ds = PackedDataset(shard_dir, seq_len=32)
    x, y = ds.batch(3, 8, seed=5)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    again = PackedDataset(shard_dir, seq_len=32)  # a fresh process after a restart: same data at step 3
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(again.batch(3, 8, seed=5), (x, y)))
    assert not torch.equal(ds.batch(4, 8, seed=5)[0], x)
    assert not torch.equal(ds.batch(3, 8, seed=6)[0], x)


def test_every_window_once_per_epoch(shard_dir):
    ds = PackedDataset(shard_dir, seq_len=16)
    n, b = ds.n_windows, 4
    steps = n // b
    seen = [w for s in range(steps) for w in ds.window_ids(s, b, seed=1)]
    assert len(set(seen)) == len(seen) == steps * b
    # the next epoch uses a different order
    assert ds.window_ids(0, b, seed=1) != ds.window_ids(n, b, seed=1)[:b] or n % b


@pytest.mark.parametrize("world", [2, 4])
def test_global_batch_is_independent_of_world_size(shard_dir, world):
    ds = PackedDataset(shard_dir, seq_len=24)
    full_x, full_y = ds.batch(7, 8, seed=0)
    parts = [ds.batch(7, 8, rank=r, world=world, seed=0) for r in range(world)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_y)


def test_errors(shard_dir, tmp_path):
    ds = PackedDataset(shard_dir, seq_len=8)
    with pytest.raises(ValueError, match="divisible"):
        ds.batch(0, 6, rank=0, world=4)
    with pytest.raises(ValueError, match="rank"):
        ds.batch(0, 4, rank=2, world=2)
    with pytest.raises(ValueError, match="too few"):
        PackedDataset(shard_dir, seq_len=10**7)
    with pytest.raises(FileNotFoundError, match="index.json"):
        PackedDataset(tmp_path, seq_len=8)
    broken = tmp_path / "broken"
    broken.mkdir()
    index = json.loads((shard_dir / "index.json").read_text())
    (broken / "index.json").write_text(json.dumps(index))
    for s in index["shards"]:
        (broken / s["file"]).write_bytes((shard_dir / s["file"]).read_bytes()[:-2])
    with pytest.raises(ValueError, match="size does not match"):
        PackedDataset(broken, seq_len=8)


def mixed_folder(root):
    """A folder as people have them: prose in several formats, one Latin-1 file, a UTF-16 file, an
    image, and hidden files and folders."""
    (root / "notes").mkdir(parents=True)
    (root / "a.txt").write_text("plain text " * 40)
    (root / "b.rst").write_text("Title\n=====\n\nrestructured text " * 20)
    (root / "notes" / "c.md").write_text("# markdown\n" + "words " * 40)
    (root / "notes" / "d.tex").write_text("\\section{TeX} " * 30)
    (root / "e.py").write_text("def f(x):\n    return x + 1\n" * 20)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 10)
    (root / "ok\ufffd.md").write_text("a replacement character \ufffd already in the text is not a loss")
    (root / "utf16.txt").write_bytes("wide text".encode("utf-16"))
    (root / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (root / "data.csv").write_text("a,b\n1,2\n")
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.txt").write_text("ref: refs/heads/main")
    (root / "empty.txt").write_text("  \n")
    return root


def test_a_mixed_folder_is_read_robustly_and_reported(tmp_path):
    from nanoseek.data.corpus import CorpusReport

    root = mixed_folder(tmp_path / "corpus")
    report = CorpusReport()
    docs = list(read_corpus(root, report))
    assert len(docs) == 7 == report.documents  # a b c d e latin1 ok; not the empty one
    latin = next(d for d in docs if d.startswith("caf"))
    assert latin.count("\ufffd") == 40 and "cr" in latin  # 4 bad bytes x 10 replaced, the rest kept
    assert report.replaced == [(root / "latin1.txt", 40)]  # U+FFFD already in ok\ufffd.md is not counted
    assert report.read == {".txt": 3, ".rst": 1, ".md": 2, ".tex": 1, ".py": 1}  # empty.txt was read
    assert report.skipped == {"binary (NUL bytes; UTF-16 text must be converted to UTF-8)": 1,
                              "not a text file (.png)": 1, "not a text file (.csv)": 1}
    lines = report.lines()
    assert lines[0] == "corpus: read 7 documents from 8 file(s) (2 .md, 1 .py, 1 .rst, 1 .tex, 3 .txt)"
    assert lines[1].startswith("corpus: skipped 3 file(s): ") and str(root / "utf16.txt") in lines[1]
    assert str(root / "picture.png") in lines[1] and ".git" not in lines[1] and ".DS_Store" not in lines[1]
    assert lines[2] == (f"corpus: warning: {root / 'latin1.txt'} is not valid UTF-8: 40 undecodable byte "
                        "sequence(s) replaced with U+FFFD (convert it, e.g. iconv -f latin1 -t utf-8)")
    assert len(lines) == 3


def test_a_jsonl_line_with_invalid_utf8_is_replaced_and_counted(tmp_path):
    from nanoseek.data.corpus import CorpusReport

    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "good"}\n{"text": "bad \xff byte"}\n')
    report = CorpusReport()
    assert list(read_corpus(f, report)) == ["good", "bad \ufffd byte"]
    assert report.replaced == [(f, 1)] and report.documents == 2


def test_a_folder_without_text_is_one_clear_error(tmp_path):
    from nanoseek.errors import NanoseekError

    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(NanoseekError, match=r"holds no readable files.*\.rst"):
        list(read_corpus(tmp_path))


def test_train_on_a_mixed_folder_says_what_it_read(tmp_path):
    """`nanoseek train` on a folder with a Latin-1 file and a binary file trains, and prints the report
    once (the tokenizer and the shards read the corpus twice)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = mixed_folder(tmp_path / "corpus")
    for i in range(30):  # enough tokens for a few 64-token windows
        (root / f"story{i}.txt").write_text(" ".join(f"line {i} word {j}." for j in range(40)))
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    r = subprocess.run([sys.executable, "-m", "nanoseek.cli", "train", "--config", str(tiny), "--out",
                        str(tmp_path / "run"), "--set", f"data.source={root}", "--set", "data.vocab_size=300",
                        "--set", "train.steps=2", "--no-progress", "--threads", "1"], capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert out.count("corpus: read 37 documents from 38 file(s)") == 1, out
    assert f"{root / 'latin1.txt'} is not valid UTF-8: 40 undecodable" in out
    assert "corpus: skipped 3 file(s)" in out and (tmp_path / "run" / "final" / "config.json").is_file()
