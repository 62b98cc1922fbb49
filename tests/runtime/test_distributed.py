"""2-process data-parallel pre-training (torchrun, gloo on the CPU) against one process.

Tolerance: the per-step losses agree to 2e-4 relative. DDP averages the two ranks' gradients
(each the mean over the same number of tokens), which is the one-process gradient up to float
summation order; FSDP2 reduce-scatters the same sums.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from colafx.runtime import pretrain as P

ARGS = ["--preset", "llama-tiny", "--seq-len", "32", "--steps", "4", "--warmup", "1", "--lr", "3e-3",
        "--eval-every", "2", "--eval-blocks", "6", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pydoc_data.topics import topics

    from colafx.runtime import data as D

    root = tmp_path_factory.mktemp("dist")
    docs = [topics[k] for k in sorted(topics)[:20]]
    (root / "data").mkdir()
    for i, doc in enumerate(docs):
        (root / "data" / f"{i:02d}.txt").write_text(doc)
    D.train_tokenizer(docs, 512).save_pretrained(root / "tok")
    single = P.train(P.PretrainConfig(preset="llama-tiny", data=str(root / "data"), tokenizer=str(root / "tok"),
                                      seq_len=32, batch_size=4, steps=4, warmup=1, lr=3e-3, eval_every=2,
                                      eval_blocks=6, out=str(root / "single"), progress=False))
    return root, single


def _rows(out, split):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == split]


def _torchrun(root, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "colafx.cli", "pretrain", *ARGS, "--data", str(root / "data"), "--tokenizer", str(root / "tok"),
           "--batch-size", "2", "--out", str(out), *extra]
    # TMPDIR: torchrun's log folder (torchelastic_*) goes under the test's folder, not /tmp, where it stays
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(root)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def fsdp_run(setup):
    """The 2-process FSDP2 run (checkpoints at steps 2 and 4) and its output."""
    root, _ = setup
    return root / "fsdp", _torchrun(root, root / "fsdp", "--fsdp")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process(setup, mode, request):
    root, single = setup
    if mode == "fsdp":
        out, proc = request.getfixturevalue("fsdp_run")
    else:
        out = root / mode
        proc = _torchrun(root, out)
    assert proc.stdout.count("final validation loss") == 1          # only rank 0 reports and writes
    want = [r["loss"] for r in single.history if r["split"] == "train"]
    assert _rows(out, "train") == pytest.approx(want, rel=2e-4)
    assert _rows(out, "val") == pytest.approx(_rows(root / "single", "val"), rel=2e-4)
    assert (out / "model" / "model.safetensors").exists() and (out / "checkpoints" / "step-00000004").is_dir()


def test_fsdp_bf16_autocast_uses_mixed_precision_with_fp32_master_weights(setup):
    """--fsdp --dtype bf16-autocast: FSDP2's MixedPrecisionPolicy computes in bf16 and reduces in
    fp32; the saved weights stay fp32 and the losses follow the fp32 run to bf16 precision."""
    from safetensors import safe_open

    root, single = setup
    out = root / "fsdp-bf16"
    _torchrun(root, out, "--fsdp", "--dtype", "bf16-autocast", "--device", "cpu")
    want = [r["loss"] for r in single.history if r["split"] == "train"]
    got = _rows(out, "train")
    assert got == pytest.approx(want, rel=3e-2) and got != pytest.approx(want, rel=1e-6)  # bf16, not fp32 math
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_fsdp_checkpoints_are_sharded_per_rank_and_resume_equals_the_uninterrupted_run(setup, fsdp_run):
    """Under 2-process FSDP2 each checkpoint is a DCP folder with one shard file per rank (no full
    state on rank 0); resuming from the step-2 checkpoint, as after a crash there, reproduces the
    uninterrupted run's step-3/4 losses and final weights exactly."""
    import shutil

    from safetensors.torch import load_file

    import colafx
    from colafx.runtime import checkpoint as ckpt

    root, _ = setup
    full, _ = fsdp_run
    for step in (2, 4):
        folder = full / "checkpoints" / f"step-{step:08d}"
        manifest = json.loads((folder / ckpt.MANIFEST_NAME).read_text())
        assert manifest["format"] == "sharded"
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(manifest["shards"])
        assert (folder / ckpt.SHARDED_NAME / "__1_0.distcp").stat().st_size > 0
        assert not (folder / "model.safetensors").exists()              # nothing gathered on rank 0
    assert not list((full / "checkpoints").glob(".*"))                 # no temporary folders left

    crashed = root / "fsdp-crashed"                                    # the run as a crash after step 2 leaves it
    shutil.copytree(full / "checkpoints" / "step-00000002", crashed / "checkpoints" / "step-00000002")
    rows = [line for line in (full / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2]
    (crashed / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    _torchrun(root, crashed, "--fsdp", "--resume")
    assert _rows(crashed, "train") == _rows(full, "train")
    assert _rows(crashed, "val") == _rows(full, "val")
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(crashed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    weights = colafx.load(full / "model").state_dict()                 # the consolidated model loads
    assert all(torch.equal(weights[k], a[k]) for k in a)
