"""colafx prepare on Hugging Face datasets sources (hf:...): packaged builders streamed from local
files, save_to_disk folders (Dataset and DatasetDict splits), a local dataset folder resolved offline,
kill-then-resume, and clear errors. Every source must give the tokens the native readers give."""
import json

import datasets
import numpy as np
import pytest

from colafx.runtime import data as D
from colafx.runtime import hf_source as H
from colafx.runtime import prepare as PR


def _prepare(sources, tokenizer_dir, out, **kw):
    kw = {"shard_tokens": 3000, "batch_docs": 4, "progress": False, **kw}
    return PR.prepare(PR.PrepareConfig(sources=sources, tokenizer=tokenizer_dir, out=str(out), **kw))


def _tokens(out, key="shards"):
    index = PR.read_index(out)
    shards = index["shards"] if key == "shards" else [index["val"]]
    return np.concatenate([np.fromfile(out / s["file"], dtype=index["dtype"]) for s in shards]).tolist()


def _want(tokenizer_dir, texts):
    tok = D.load_any_tokenizer(tokenizer_dir)
    return [t for ids in tok(texts, add_special_tokens=False)["input_ids"] for t in ids + [tok.eos_token_id]]


def test_parse_spellings():
    assert H.parse("hf:json:c4/*.json.gz") == H.HFSource("hf:json:c4/*.json.gz", "c4/*.json.gz", "json")
    assert H.parse("hf:data/wiki:validation") == H.HFSource("hf:data/wiki:validation", "data/wiki", None,
                                                            "validation")
    assert H.parse("hf:user/name") == H.HFSource("hf:user/name", "user/name", None, "train")
    assert H.parse("hf:user/name:train[:10%]").split == "train[:10%]"
    with pytest.raises(ValueError, match="give the files after hf:parquet:"):
        H.parse("hf:parquet:")


@pytest.mark.parametrize("builder", ["json", "parquet", "text"])
def test_packaged_builders_stream_the_documents_the_native_readers_read(builder, docs, tokenizer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    if builder == "json":   # C4's layout: gzipped JSON lines with a text field and others
        import gzip

        for i in range(2):
            with gzip.open(src / f"c4-train.0000{i}-of-01024.json.gz", "wt") as f:
                f.writelines(json.dumps({"text": d, "url": "u"}) + "\n" for d in docs[i::2])
        pattern = str(src / "*.json.gz")
    elif builder == "parquet":
        for i in range(2):
            pq.write_table(pa.table({"text": docs[i::2], "id": list(range(len(docs[i::2])))}), src / f"{i}.parquet")
        pattern = str(src / "*.parquet")
    else:                   # one document per file, as colafx reads .txt files
        for i, d in enumerate(docs[:10]):
            (src / f"{i:02d}.txt").write_text(d)
        pattern = str(src / "*.txt")
    assert isinstance(H._open(H.parse(f"hf:{builder}:{pattern}")), datasets.IterableDataset)  # streaming
    native = [d for f in D.expand_sources([pattern]) for d in D.iter_path(f)]
    index = _prepare([f"hf:{builder}:{pattern}"], tokenizer_dir, tmp_path / "out")
    assert index["complete"] and index["sources"] == [f"hf:{builder}:{pattern}"]
    assert _tokens(tmp_path / "out") == _want(tokenizer_dir, native)


def test_save_to_disk_folders_and_their_splits(docs, tokenizer_dir, tmp_path):
    datasets.Dataset.from_dict({"text": docs[:30]}).save_to_disk(tmp_path / "single")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:30]}),
                          "validation": datasets.Dataset.from_dict({"text": docs[30:]})}).save_to_disk(tmp_path / "dd")
    _prepare([f"hf:{tmp_path / 'single'}"], tokenizer_dir, tmp_path / "a")
    _prepare([f"hf:{tmp_path / 'dd'}"], tokenizer_dir, tmp_path / "b", val_data=[f"hf:{tmp_path / 'dd'}:validation"])
    assert _tokens(tmp_path / "a") == _tokens(tmp_path / "b") == _want(tokenizer_dir, docs[:30])
    assert _tokens(tmp_path / "b", "val") == _want(tokenizer_dir, docs[30:])
    assert D.read_texts(f"hf:{tmp_path / 'dd'}:validation") == docs[30:]   # pretrain --data hf:... (in memory)
    with pytest.raises(FileNotFoundError, match=r"no split 'test' \(splits: train, validation\)"):
        _prepare([f"hf:{tmp_path / 'dd'}:test"], tokenizer_dir, tmp_path / "c")


def test_local_dataset_folder_resolves_offline_with_splits_from_file_names(docs, tokenizer_dir, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "wiki"
    folder.mkdir()
    for split, part in (("train", docs[:30]), ("validation", docs[30:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    _prepare([f"hf:{folder}"], tokenizer_dir, tmp_path / "out", val_data=[f"hf:{folder}:validation"])
    assert _tokens(tmp_path / "out") == _want(tokenizer_dir, docs[:30])
    assert _tokens(tmp_path / "out", "val") == _want(tokenizer_dir, docs[30:])


def test_killed_run_on_a_streamed_source_resumes_to_the_same_shards(docs, tokenizer_dir, tmp_path, monkeypatch):
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(tmp_path / "ds")
    source = [f"hf:{tmp_path / 'ds'}"]
    full = _prepare(source, tokenizer_dir, tmp_path / "full", shard_tokens=2000)
    real = PR._write_shard
    calls = {"n": 0}

    def dies_on_third(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(PR, "_write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        _prepare(source, tokenizer_dir, tmp_path / "cut", shard_tokens=2000)
    assert len(PR.read_index(tmp_path / "cut")["shards"]) == 2
    monkeypatch.setattr(PR, "_write_shard", real)
    resumed = _prepare(source, tokenizer_dir, tmp_path / "cut", shard_tokens=2000)
    assert len(full["shards"]) > 2
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in full["shards"]]


def test_bad_hf_sources_are_clear_errors_before_anything_is_written(docs, tokenizer_dir, tmp_path):
    datasets.Dataset.from_dict({"content": docs[:3], "id": [1, 2, 3]}).save_to_disk(tmp_path / "notext")
    with pytest.raises(ValueError, match=r"has no 'text' column \(columns: content, id\)"):
        _prepare([f"hf:{tmp_path / 'notext'}"], tokenizer_dir, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        _prepare([f"hf:json:{tmp_path / 'none' / '*.json.gz'}"], tokenizer_dir, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    # HF_HUB_OFFLINE=1 (tests/conftest.py): an uncached dataset name is not fetched
    with pytest.raises(FileNotFoundError, match="no-such-user/no-such-dataset is not available locally"):
        _prepare(["hf:no-such-user/no-such-dataset"], tokenizer_dir, tmp_path / "c")
