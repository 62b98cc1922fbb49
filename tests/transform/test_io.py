"""save() / load(): round trip, atomic files, clear errors on missing or corrupt checkpoints."""
import json

import pytest
import torch

import colafx
from colafx.transform.io import CheckpointError
from colafx.transform.modules import CoLALinear
from tests.llama_plain import PlainLlama


def test_round_trip_gives_identical_logits(tiny_model, tmp_path):
    colafx.colaify(tiny_model, rank={"default": 16, "down": 8})
    colafx.save(tiny_model, tmp_path / "ck")
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["colafx.json", "model.safetensors"]  # no temporary files left behind
    loaded = colafx.load(tmp_path / "ck")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, CoLALinear)
    assert loaded.model.layers[0].mlp.down_proj.rank == 8
    ids = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(loaded(ids).logits, tiny_model(ids).logits, rtol=0, atol=0)


def test_round_trip_dense_and_bf16(tmp_path):
    model = colafx.presets.build("llama-tiny", dtype=torch.bfloat16, seed=1)
    colafx.save(model, tmp_path)
    loaded = colafx.load(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_plain_model_needs_skeleton(tmp_path):
    model = PlainLlama(fused=True)
    colafx.colaify(model, example_inputs=(torch.zeros(1, 8, dtype=torch.long),))
    colafx.save(model, tmp_path)
    with pytest.raises(CheckpointError, match="model="):
        colafx.load(tmp_path)
    loaded = colafx.load(tmp_path, model=PlainLlama(fused=True))
    ids = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_missing_directory_and_files(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        colafx.load(tmp_path / "nope")
    colafx.save(tiny_model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        colafx.load(tmp_path)


def test_corrupt_weights_are_detected(tmp_path, tiny_model):
    colafx.save(tiny_model, tmp_path)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        colafx.load(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        colafx.load(tmp_path, verify=False)


def test_corrupt_or_foreign_json(tmp_path, tiny_model):
    colafx.save(tiny_model, tmp_path)
    (tmp_path / "colafx.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        colafx.load(tmp_path)
    (tmp_path / "colafx.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a colafx checkpoint"):
        colafx.load(tmp_path)


def test_mismatched_weights_are_refused(tmp_path, tiny_model):
    colafx.colaify(tiny_model)
    colafx.save(tiny_model, tmp_path)
    record = json.loads((tmp_path / "colafx.json").read_text())
    del record["transforms"]["cola"]["model.layers.0.mlp.up_proj"]  # claims up_proj is dense
    (tmp_path / "colafx.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="does not fit"):
        colafx.load(tmp_path)


def test_failed_save_keeps_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    colafx.save(tiny_model, tmp_path)
    good = (tmp_path / "model.safetensors").read_bytes()

    def broken_save(model, path, *a, **k):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_model", broken_save)
    with pytest.raises(OSError, match="disk full"):
        colafx.save(tiny_model, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colafx.json", "model.safetensors"]
    colafx.load(tmp_path)
