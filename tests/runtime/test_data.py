"""Corpora, tokenizer, packing, document split and the deterministic block stream."""
import json

import pytest
import torch

from colafx.runtime import data as D

TEXTS = [f"Document {i}: the quick brown fox number {i} jumps over {i % 7} lazy dogs.\n" * (3 + i % 5)
         for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return D.train_tokenizer(TEXTS, vocab_size=300)


def test_embedded_corpus_is_english_python_documentation():
    docs = D.embedded_corpus()
    text = "".join(docs)
    assert len(text) > 300_000          # enough for a few hundred thousand tokens
    assert "the" in text and "def" in text
    assert all(isinstance(d, str) and d.strip() for d in docs)


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\0")
    assert D.read_texts(tmp_path) == ["alpha text", "beta", "gamma"]
    assert D.read_texts(tmp_path / "a.txt") == ["alpha text"]
    assert D.read_texts([{"text": "row one"}, {"text": "row two"}]) == ["row one", "row two"]
    assert D.read_texts(["x" * 2000]) == ["x" * 2000]


def test_read_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.read_texts(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no text key"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 has no 'text' field"):
        D.read_texts(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 is not valid JSON"):
        D.read_texts(bad)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported data file"):
        D.read_texts(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="'text' field"):
        D.read_texts([{"sentence": "no"}])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no .txt/.md/.jsonl/.json.gz/.jsonl.zst/.parquet files"):
        D.read_texts(empty)


def test_parquet_needs_pyarrow_or_reads_text_column(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            D.read_texts(tmp_path / "d.parquet")
    else:
        pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "d.parquet")
        assert D.read_texts(tmp_path / "d.parquet") == ["one", "two"]


def test_bpe_round_trip_and_reload(tokenizer, tmp_path):
    assert len(tokenizer) <= 300 and tokenizer.eos_token == D.EOS_TOKEN
    text = "The quick brown fox number 12 jumps over 3 lazy dogs.\nUnseen: Zürich ∑"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text                  # byte-level: lossless, no unknown tokens
    assert len(ids) < len(text.encode())                  # merges were learned
    tokenizer.save_pretrained(tmp_path / "tok")
    again = D.load_any_tokenizer(tmp_path / "tok")
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    again = D.load_any_tokenizer(tmp_path / "tok" / "tokenizer.json")
    assert again(text, add_special_tokens=False)["input_ids"] == ids and again.eos_token == D.EOS_TOKEN
    with pytest.raises(ValueError, match="vocab_size >= 257"):
        D.train_tokenizer(TEXTS, vocab_size=100)


def test_encode_large_document_in_chunks_matches_whole(tokenizer, monkeypatch):
    doc = "".join(TEXTS)
    whole = D.encode([doc], tokenizer)[0]
    monkeypatch.setattr(D, "_ENCODE_CHUNK", 7)
    assert D.encode([doc], tokenizer)[0] == whole


def test_pack_concatenates_with_eos():
    blocks = D.pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=3, eos_id=0)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert D.pack([[1, 2, 3, 4, 5]], seq_len=1, eos_id=None).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="not enough for one block"):
        D.pack([[1, 2]], seq_len=8, eos_id=0)
    with pytest.raises(ValueError, match="seq_len"):
        D.pack([[1, 2]], seq_len=0, eos_id=0)


def test_split_documents_is_disjoint_and_seeded():
    train, val = D.split_documents(TEXTS, 0.2, seed=3)
    assert sorted(train + val) == sorted(TEXTS) and not set(train) & set(val)
    share = sum(map(len, val)) / sum(map(len, TEXTS))
    assert 0.2 <= share < 0.35
    assert D.split_documents(TEXTS, 0.2, seed=3) == (train, val)
    assert D.split_documents(TEXTS, 0.2, seed=4) != (train, val)
    with pytest.raises(ValueError, match="val_fraction"):
        D.split_documents(TEXTS, 1.5, 0)
    train, val = D.split_documents(["line one\nline two\nline three\n"], 0.3, 0)
    assert (train, val) == (["line one\nline two\n"], ["line three\n"])
    with pytest.raises(ValueError, match="no line break"):
        D.split_documents(["one long line"], 0.1, 0)


def test_block_stream_epochs_and_rank_shards():
    blocks = torch.arange(10).unsqueeze(1).repeat(1, 3)
    stream = D.BlockStream(blocks, seed=1)
    epoch = torch.cat([stream.batch(s, 2) for s in range(5)])[:, 0]
    assert sorted(epoch.tolist()) == list(range(10))      # every block once per epoch
    assert epoch.tolist() != list(range(10))               # shuffled
    nxt = torch.cat([stream.batch(s, 2) for s in range(5, 10)])[:, 0]
    assert sorted(nxt.tolist()) == list(range(10)) and nxt.tolist() != epoch.tolist()
    # A rank reads its slice of the global batch; together they read what one process reads.
    for step in (0, 4, 7):
        shards = torch.cat([stream.batch(step, 4, rank=r, world=2) for r in range(2)])
        assert torch.equal(shards, D.BlockStream(blocks, seed=1).batch(step, 4))
    with pytest.raises(ValueError, match="not divisible"):
        stream.batch(0, 3, rank=0, world=2)


def test_calibration_ids_take_the_first_tokens_in_windows(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("\n\n".join(TEXTS * 20))
    ids = D.calibration_ids(tmp_path / "a.txt", tokenizer, tokens=100, window=32)
    assert ids.shape == (3, 32) and ids.dtype == torch.long
    expected = D.encode(["\n\n".join(TEXTS * 20)], tokenizer)[0][:96]
    assert ids.flatten().tolist() == expected
    with pytest.raises(ValueError, match="fewer than one window"):
        D.calibration_ids([{"text": "a b"}], tokenizer, tokens=100, window=64)
    with pytest.raises(ValueError, match="must be positive"):
        D.calibration_ids(tmp_path / "a.txt", tokenizer, tokens=0)
    with pytest.raises(FileNotFoundError):
        D.calibration_ids(tmp_path / "missing.txt", tokenizer)
