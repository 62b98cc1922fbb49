"""Training checkpoints: round trip of every state, keep-last-k, atomicity, refusal of bad files."""
import json
import random

import pytest
import torch

import colafx
from colafx.runtime import checkpoint as ckpt
from colafx.transform.io import CheckpointError

FP = {"preset": "llama-tiny", "lr": 1e-3, "global_batch": 4}


_PLANS = {}


def _tiny(seed=0, rank=8):
    """llama-tiny, CoLA at ``rank`` (None: dense); the plan (a torch.export capture) is made once."""
    from colafx import presets
    from colafx.transform.colaify import apply_plan

    model = presets.build("llama-tiny", seed=seed)
    if rank is not None:
        if rank not in _PLANS:
            _PLANS[rank] = colafx.plan(model, rank=rank)
        apply_plan(model, _PLANS[rank], torch.Generator().manual_seed(seed))
    return model


def _state(seed=0, cola=True):
    model = _tiny(seed, 8 if cola else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _save(root, step, model, opt, sched, keep=2, fp=FP):
    return ckpt.save_checkpoint(root, step, model, opt.state_dict(), sched.state_dict(), fp,
                                extra={"note": "x"}, keep=keep)


def test_round_trip_restores_weights_optimizer_scheduler_rng(tmp_path):
    model, opt, sched = _state(0)
    torch.manual_seed(123)
    random.seed(7)
    path = _save(tmp_path, 5, model, opt, sched)
    expected = (torch.rand(3), random.random())

    fresh, fresh_opt, fresh_sched = _state(1)
    state = ckpt.load_checkpoint(path, fresh, FP)
    fresh_opt.load_state_dict(state["optimizer"])
    fresh_sched.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"])
    assert state["step"] == 5 and state["extra"] == {"note": "x"}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert fresh_sched.last_epoch == sched.last_epoch
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    # the model part is an ordinary colafx checkpoint
    assert torch.equal(colafx.load(path).lm_head.weight, model.lm_head.weight)


def test_keeps_last_k_and_leaves_no_temporary_folders(tmp_path):
    model, opt, sched = _state()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, sched, keep=2)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert ckpt.latest(tmp_path).name == "step-00000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]
    assert ckpt.latest(tmp_path / "none") is None
    with pytest.raises(ValueError, match="keep"):
        _save(tmp_path, 5, model, opt, sched, keep=0)


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _state()
    good = _save(tmp_path, 1, model, opt, sched)

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, model, opt, sched)
    monkeypatch.undo()
    assert ckpt.checkpoints(tmp_path) == [good] and list(tmp_path.iterdir()) == [good]
    ckpt.load_checkpoint(good, _state(1)[0], FP)


@pytest.mark.parametrize("damage", ["weights", "state", "manifest", "missing"])
def test_corrupt_checkpoint_is_refused(tmp_path, damage):
    model, opt, sched = _state()
    path = _save(tmp_path, 3, model, opt, sched)
    if damage == "weights":
        f = path / "model.safetensors"
        raw = bytearray(f.read_bytes())
        raw[-5] ^= 0xFF
        f.write_bytes(bytes(raw))
        match = "model.safetensors is corrupt"
    elif damage == "state":
        f = path / ckpt.STATE_NAME
        f.write_bytes(f.read_bytes()[:100])
        match = "trainer.pt is corrupt"
    elif damage == "manifest":
        (path / ckpt.MANIFEST_NAME).write_text('{"step": ')
        match = "trainer.json is corrupt"
    else:
        (path / ckpt.STATE_NAME).unlink()
    if damage == "missing":
        with pytest.raises(FileNotFoundError, match="incomplete"):
            ckpt.load_checkpoint(path, _state(1)[0], FP)
    else:
        with pytest.raises(CheckpointError, match=match):
            ckpt.load_checkpoint(path, _state(1)[0], FP)


def test_mismatched_run_or_model_is_refused(tmp_path):
    model, opt, sched = _state()
    path = _save(tmp_path, 3, model, opt, sched)
    with pytest.raises(CheckpointError, match=r"different run \(lr: checkpoint 0.001 vs run 0.002\)"):
        ckpt.load_checkpoint(path, _state(1)[0], {**FP, "lr": 2e-3})
    with pytest.raises(CheckpointError, match="different model structure"):
        ckpt.load_checkpoint(path, _state(1, cola=False)[0], FP)
    other_rank = _tiny(0, rank=4)
    with pytest.raises(CheckpointError, match="different model structure"):
        ckpt.load_checkpoint(path, other_rank, FP)
    assert json.loads((path / ckpt.MANIFEST_NAME).read_text())["fingerprint"] == FP
