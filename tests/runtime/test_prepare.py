"""colafx prepare: streamed formats, shards + index, 1 vs N workers, resume, errors; pretrain on it."""
import gzip
import json

import numpy as np
import pytest
import torch

from colafx.runtime import data as D
from colafx.runtime import prepare as PR
from colafx.runtime import pretrain as P


def _write_formats(folder, docs):
    """The same documents as .txt, .md, .jsonl, .json.gz (C4's layout), .jsonl.zst and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir(parents=True, exist_ok=True)
    parts = [docs[i::6] for i in range(6)]
    (folder / "a.txt").write_text(parts[0][0])
    (folder / "b.md").write_text(parts[1][0])
    lines = lambda ds: "".join(json.dumps({"text": d, "url": "x"}) + "\n" for d in ds)  # noqa: E731
    (folder / "c.jsonl").write_text(lines(parts[2]))
    with gzip.open(folder / "c4-train.00000-of-01024.json.gz", "wt") as f:
        f.write(lines(parts[3]))
    (folder / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines(parts[4]).encode()))
    pq.write_table(pa.table({"text": parts[5]}), folder / "f.parquet")
    return [parts[0][0], parts[1][0], *parts[2], *parts[3], *parts[4], *parts[5]]


def _tokens(out):
    index = PR.read_index(out)
    return np.concatenate([np.fromfile(out / s["file"], dtype=index["dtype"]) for s in index["shards"]])


def test_every_format_streams_and_tokens_match_encode(docs, tokenizer_dir, tmp_path):
    expected_docs = _write_formats(tmp_path / "src", docs)
    files = D.expand_sources([tmp_path / "src"])
    assert [f.name for f in files] == ["a.txt", "b.md", "c.jsonl", "c4-train.00000-of-01024.json.gz", "e.jsonl.zst",
                                       "f.parquet"]
    assert [d for f in files for d in D.iter_path(f)] == expected_docs
    out = tmp_path / "prep"
    index = PR.prepare(PR.PrepareConfig(sources=[str(tmp_path / "src")], tokenizer=tokenizer_dir, out=str(out),
                                        shard_tokens=2000, batch_docs=4, progress=False))
    tok = D.load_any_tokenizer(tokenizer_dir)
    streamed = [d for f in files for d in D.iter_path(f)]
    want = [t for ids in tok(streamed, add_special_tokens=False)["input_ids"] for t in ids + [tok.eos_token_id]]
    assert index["complete"] and index["dtype"] == "uint16" and len(index["shards"]) >= 2
    assert _tokens(out).tolist() == want
    assert index["total_tokens"] == len(want) and sum(s["docs"] for s in index["shards"]) == len(streamed)


def test_one_and_two_workers_write_identical_shards(docs, tokenizer_dir, tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        PR.prepare(PR.PrepareConfig(sources=[str(tmp_path / "c.jsonl")], tokenizer=tokenizer_dir, out=str(out),
                                    workers=workers, shard_tokens=3000, batch_docs=5, val_tokens=500,
                                    progress=False))
        outs.append(out)
    a, b = (PR.read_index(o) for o in outs)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["val"]["sha256"] == b["val"]["sha256"] and a["val"]["tokens"] >= 500


def test_two_workers_with_val_data_tokenize_it_in_the_main_process(docs, tokenizer_dir, tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:40]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[40:]))
    out = tmp_path / "out"
    index = PR.prepare(PR.PrepareConfig(sources=[str(tmp_path / "train.jsonl")], tokenizer=tokenizer_dir,
                                        out=str(out), workers=2, batch_docs=4, val_data=[str(tmp_path / "val.jsonl")],
                                        progress=False))
    tok = D.load_any_tokenizer(tokenizer_dir)
    want = [t for ids in tok(docs[40:], add_special_tokens=False)["input_ids"] for t in ids + [tok.eos_token_id]]
    assert np.fromfile(out / index["val"]["file"], dtype=index["dtype"]).tolist() == want
    assert index["total_tokens"] == len(_tokens(out))


def test_killed_run_resumes_after_its_finished_shards(docs, tokenizer_dir, tmp_path, monkeypatch):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    config = dict(sources=[str(tmp_path / "c.jsonl")], tokenizer=tokenizer_dir, shard_tokens=2000, batch_docs=4,
                  progress=False)
    PR.prepare(PR.PrepareConfig(out=str(tmp_path / "full"), **config))
    real = PR._write_shard
    calls = {"n": 0}

    def dies_on_third(path, tokens, docs_, dtype):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(path, tokens, docs_, dtype)

    monkeypatch.setattr(PR, "_write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        PR.prepare(PR.PrepareConfig(out=str(tmp_path / "cut"), **config))
    cut = PR.read_index(tmp_path / "cut")
    assert not cut["complete"] and len(cut["shards"]) == 2
    assert not list((tmp_path / "cut").glob("*.tmp"))  # the interrupted shard left no partial file
    monkeypatch.setattr(PR, "_write_shard", real)
    resumed = PR.prepare(PR.PrepareConfig(out=str(tmp_path / "cut"), **config))
    full = PR.read_index(tmp_path / "full")
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in full["shards"]]


def test_bad_input_is_a_clear_error_and_keeps_finished_shards(docs, tokenizer_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:30]))
    with gzip.open(src / "b.json.gz", "wt") as f:
        f.write(json.dumps({"content": "no text field"}) + "\n")
    out = tmp_path / "prep"
    with pytest.raises(ValueError, match=r"b.json.gz:1 has no 'text' field"):
        PR.prepare(PR.PrepareConfig(sources=[str(src)], tokenizer=tokenizer_dir, out=str(out), shard_tokens=1000,
                                    batch_docs=4, progress=False))
    index = PR.read_index(out)
    assert index["shards"] and not index["complete"]
    PR._check_shards(out, index)  # the finished shards are intact
    # a truncated shard is named when the directory is used
    first = out / index["shards"][0]["file"]
    first.write_bytes(first.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"train-00000.bin is truncated"):
        PR._check_shards(out, index)
    with pytest.raises(ValueError, match="give at least one source"):
        PR.prepare(PR.PrepareConfig(tokenizer=tokenizer_dir, out=str(out)))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        PR.prepare(PR.PrepareConfig(sources=[str(tmp_path / "*.none")], tokenizer=tokenizer_dir, out=str(out)))


@pytest.fixture(scope="module")
def prepared(docs, tokenizer_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = folder / "prep"
    PR.prepare(PR.PrepareConfig(sources=[str(folder / "c.jsonl")], tokenizer=tokenizer_dir, out=str(out),
                                shard_tokens=4000, batch_docs=8, val_tokens=600, progress=False))
    return out


def test_windows_are_a_seeded_permutation_and_ranks_read_disjoint_windows(prepared):
    corpus = D.PreparedCorpus(prepared, seq_len=32, seed=3)
    n = len(corpus)
    assert sorted(corpus._position(p) for p in range(n)) == list(range(n))  # each window once per epoch
    assert [corpus._position(p) for p in range(n)] != list(range(n))
    rank0, rank1 = corpus.batch(5, 8, rank=0, world=2), corpus.batch(5, 8, rank=1, world=2)
    both = corpus.batch(5, 8)
    assert torch.equal(torch.cat([rank0, rank1]), both) and rank0.shape == (4, 33)
    assert not any(torch.equal(a, b) for a in rank0 for b in rank1)


def test_pretrain_on_prepared_data_resumes_exactly(prepared, tokenizer_dir, tmp_path, interrupted_train):
    base = dict(preset="llama-tiny", data=[str(prepared)], seq_len=32, batch_size=2, grad_accum=2, steps=4,
                eval_every=2, progress=False, val_tokens=400)
    full = P.train(P.PretrainConfig(out=str(tmp_path / "full"), **base))
    losses = [r["loss"] for r in full.history if r["split"] == "train"]
    assert len(losses) == 4 and all(np.isfinite(losses))
    interrupted_train(P.PretrainConfig(out=str(tmp_path / "cut"), **base), step=2)
    resumed = P.train(P.PretrainConfig(out=str(tmp_path / "cut"), resume=True, **base))
    assert [r["loss"] for r in resumed.history if r["split"] == "train"] == losses
    assert resumed.val_loss == full.val_loss


def test_pretrain_refuses_another_tokenizer(prepared, docs, tmp_path):
    other = tmp_path / "tok"
    D.train_tokenizer(docs[::-1], 600).save_pretrained(other)
    with pytest.raises(ValueError, match="differs from the one .* was prepared with"):
        P.train(P.PretrainConfig(preset="llama-tiny", data=[str(prepared)], tokenizer=str(other), seq_len=32,
                                 steps=1, out=str(tmp_path / "r"), progress=False))


def test_cli_prepare(docs, tokenizer_dir, tmp_path, capsys):
    from colafx.cli import main

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:20]))
    assert main(["prepare", str(tmp_path / "c.jsonl"), "--tokenizer", tokenizer_dir, "--out",
                 str(tmp_path / "p"), "--val-tokens", "100", "--no-progress"]) == 0
    assert "training tokens in 1 shard(s) (uint16)" in capsys.readouterr().out
