"""The pre-training loop on llama-tiny: outputs, exact resume, NaN stop, eval averaging, CLI flags."""
import json
import math

import pytest
import torch

import colafx
from colafx.runtime import checkpoint as ckpt
from colafx.runtime import data as D
from colafx.runtime import pretrain as P


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small English corpus (pydoc topics) and a BPE trained on it, saved once for all runs."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)[:30]]
    folder = tmp_path_factory.mktemp("tok")
    D.train_tokenizer(docs, 512).save_pretrained(folder)
    return docs, str(folder)


def _config(corpus, out, **kw):
    docs, tok = corpus
    base = dict(preset="llama-tiny", data=docs, tokenizer=tok, seq_len=32, batch_size=2, grad_accum=2, steps=6,
                warmup=2, lr=3e-3, eval_every=2, eval_blocks=8, out=str(out), progress=False)
    return P.PretrainConfig(**{**base, **kw})


def _train_losses(history):
    return [r["loss"] for r in history if r["split"] == "train"]


def test_lr_schedule_warmup_then_cosine_to_tenth():
    lrs = [P.lr_lambda(s, warmup=4, steps=20, min_ratio=0.1) for s in range(25)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[20] == pytest.approx(0.1) and lrs[24] == pytest.approx(0.1)
    assert lrs[12] == pytest.approx(0.55)  # half-way through the decay


def test_evaluate_averages_over_all_tokens_not_batches(tiny_model):
    blocks = torch.randint(0, 512, (5, 9), generator=torch.Generator().manual_seed(0))
    # batches of 2, 2, 1: a mean of batch means would weight the last block double
    got = P.evaluate(tiny_model, blocks, batch_size=2)
    with torch.no_grad():
        logits = tiny_model(input_ids=blocks[:, :-1]).logits
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()
    assert got == pytest.approx(want, rel=1e-5)
    assert tiny_model.training  # mode restored


def test_train_outputs_and_interrupted_resume_matches_uninterrupted(corpus, tmp_path, interrupted_train):
    full = P.train(_config(corpus, tmp_path / "full"))
    out = tmp_path / "full"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(full.history))
    assert [r["step"] for r in rows if r["split"] == "val"] == [2, 4, 6]
    assert full.val_loss == rows[-1]["loss"] and full.val_ppl == pytest.approx(math.exp(full.val_loss))
    losses = _train_losses(full.history)
    assert losses[-1] < losses[0] - 0.1                    # it learns
    assert all(r["tokens_per_s"] > 0 and r["flops_per_s"] > 0 for r in rows if r["split"] == "train")
    assert (out / "curves.png").stat().st_size > 1000
    assert [p.name for p in ckpt.checkpoints(out / "checkpoints")] == ["step-00000004", "step-00000006"]
    # final model: colafx.load + its tokenizer + HF generate
    model = colafx.load(out / "model")
    assert any(isinstance(m, colafx.transform.modules.CoLALinear) for m in model.modules())
    tok = D.load_any_tokenizer(out)
    ids = tok("The if statement", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 5)
    assert P.evaluate(model, D.pack(D.encode(corpus[0][:3], tok), 32, tok.eos_token_id)[:2], 2) > 0

    # Crash during step 5 (after the step-4 checkpoint), then --resume.
    interrupted_train(_config(corpus, tmp_path / "cut"), step=4)
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        P.train(_config(corpus, tmp_path / "cut"))
    resumed = P.train(_config(corpus, tmp_path / "cut", resume=True))
    # Same process, same data order, restored optimizer/scheduler/RNG: bit-identical on the CPU.
    assert _train_losses(resumed.history) == losses
    assert resumed.val_loss == full.val_loss
    with pytest.raises(ckpt.CheckpointError, match="different run"):
        P.train(_config(corpus, tmp_path / "cut", resume=True, lr=1e-3))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    real_loss = P.next_token_loss
    calls = {"n": 0}

    def nan_from_step_3(model, blocks, reduction="mean", autocast=None):
        loss = real_loss(model, blocks, reduction, autocast)
        if model.training:
            calls["n"] += 1
            if calls["n"] > 4:  # two micro-batches per step: step 3's first one
                return loss * float("nan")
        return loss
    monkeypatch.setattr(P, "next_token_loss", nan_from_step_3)
    with pytest.raises(P.TrainingDiverged, match=r"loss is nan at step 3.*step-00000002"):
        P.train(_config(corpus, tmp_path))
    assert [p.name for p in ckpt.checkpoints(tmp_path / "checkpoints")] == ["step-00000002"]
    monkeypatch.setattr(P, "next_token_loss", real_loss)
    resumed = P.train(_config(corpus, tmp_path, resume=True, steps=6))
    assert math.isfinite(resumed.val_loss)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown preset"):
        P.PretrainConfig(preset="llama-3b")
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        P.PretrainConfig(seq_len=0)
    with pytest.raises(ValueError, match="--rank and --dense"):
        P.PretrainConfig(dense=True, rank=8)
    with pytest.raises(ValueError, match="unknown dtype"):
        P.PretrainConfig(dtype="fp8")


@pytest.mark.parametrize("flag", ["--recompute", "--compile"])
def test_cli_recompute_and_compile_train(corpus, tmp_path, capsys, flag):
    from colafx.cli import main

    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(corpus[0]))
    argv = ["pretrain", "--preset", "llama-tiny", "--data", str(data), "--tokenizer", corpus[1], "--seq-len", "32",
            "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--eval-blocks", "4", "--val-fraction", "0.2",
            "--out", str(tmp_path / "run"), "--no-progress", flag]
    rc = main(argv)
    printed = capsys.readouterr().out
    assert rc == 0 and "final validation loss" in printed
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("split") == "train"][-1] == 2
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_explicit_cpu_device_and_environment_recorded(corpus, tmp_path):
    result = P.train(P.PretrainConfig(preset="llama-tiny", data=corpus[0], tokenizer=corpus[1], seq_len=32,
                                      batch_size=2, steps=2, eval_every=2, eval_blocks=4, val_fraction=0.2,
                                      out=str(tmp_path / "run"), progress=False, device="cpu",
                                      dtype="bf16-autocast"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    env = next(r for r in rows if r["split"] == "env")
    assert env["device"] == "cpu" and env["dtype"] == "bf16-autocast" and env["torch"] == torch.__version__
    assert env["triton"] and env["device_name"]
    assert math.isfinite(result.val_loss)
    assert next(result.model.parameters()).dtype == torch.float32  # autocast keeps fp32 master weights


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    from colafx.cli import main

    assert main(["pretrain", "--preset", "llama-tiny", "--device", "cuda", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("colafx pretrain: error: --device cuda: no CUDA device is available")
    assert not (tmp_path / "r").exists()
    for command in (["finetune", "--preset", "llama-tiny", "--task", "text", "--train-file", "x.txt"],
                    ["export", "--model", "smollm2", "--out", str(tmp_path / "m.onnx")]):
        assert main(command + ["--device", "cuda"]) == 1
        assert "no CUDA device is available" in capsys.readouterr().err


def test_resume_with_more_steps_extends_the_run(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    first = P.train(_config(corpus, out, steps=4, eval_every=2))
    capsys.readouterr()
    more = P.train(_config(corpus, out, steps=6, eval_every=2, resume=True))
    assert "the run is extended from 4 to 6 steps; the LR schedule" in capsys.readouterr().out
    assert [r["step"] for r in more.history if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert _train_losses(more.history)[:4] == _train_losses(first.history)
    lrs = {r["step"]: r["lr"] for r in more.history if r["split"] == "train"}
    cfg = P._resolve_recipe(_config(corpus, out, steps=6))
    # a row's lr is the one set for the next step; under the old 4-step schedule step 5's would be the floor
    assert lrs[5] == pytest.approx(cfg.lr * P.lr_lambda(5, cfg.warmup, 6, cfg.min_lr_ratio))
    assert lrs[5] > cfg.lr * cfg.min_lr_ratio * 1.5
    assert [p.name for p in ckpt.checkpoints(out / "checkpoints")][-1] == "step-00000006"
    with pytest.raises(ValueError, match="at step 6, past --steps 5"):
        P.train(_config(corpus, out, steps=5, resume=True))
    with pytest.raises(ckpt.CheckpointError, match="different run.*seed"):
        P.train(_config(corpus, out, steps=8, resume=True, seed=1))
