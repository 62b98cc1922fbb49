"""The pass pipeline: order, summaries, dumps (option and COLAFX_DEBUG), errors, recompute tagging."""
import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

from colafx.passes.lowering import LowerBottlenecks
from colafx.passes.manager import PassManager, TagRecompute, debug_dump_dir
from tests.passes.test_lowering import Bottleneck, lowered


class Recorder:
    """A pass that records the order it ran in and renames nothing."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def run(self, gm):
        self.log.append(self.name)
        return f"{self.name} saw {len(gm.graph.nodes)} nodes"


class Broken:
    name = "broken"

    def run(self, gm):
        raise RuntimeError("boom")


def _graph():
    """A fresh Dynamo graph of a hand-written bottleneck (not yet lowered)."""
    return lowered(Bottleneck(), Recorder("capture", []), torch.randn(2, 32))[1]


def test_passes_run_in_order_and_report(capsys):
    log = []
    records = PassManager([Recorder("first", log), Recorder("second", log)], verbose=True).run(_graph())
    assert log == ["first", "second"]
    assert [r.name for r in records] == ["first", "second"]
    assert records[0].summary.startswith("first saw ")
    assert "[colafx] second: second saw" in capsys.readouterr().out


def test_dump_writes_graph_before_and_after_each_pass(tmp_path):
    records = PassManager([LowerBottlenecks()], dump=tmp_path).run(_graph())
    (folder,) = list(tmp_path.iterdir())
    before = (folder / "00_fuse_lowrank.before.py").read_text()
    after = (folder / "00_fuse_lowrank.after.py").read_text()
    silu, fused = "torch.nn.functional.silu(", "torch.ops.colafx.lowrank_act.default("
    assert silu in before and fused not in before
    assert fused in after and silu not in after
    assert (folder / "summary.txt").read_text() == f"{records[0]}\n"
    PassManager([LowerBottlenecks()], dump=tmp_path).run(_graph())
    assert len(list(tmp_path.iterdir())) == 2  # a second graph never overwrites the first


def test_colafx_debug_env_selects_dump_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("COLAFX_DEBUG", raising=False)
    assert debug_dump_dir() is None
    monkeypatch.setenv("COLAFX_DEBUG", "1")
    assert str(debug_dump_dir()) == "colafx_debug"
    monkeypatch.setenv("COLAFX_DEBUG", str(tmp_path))
    PassManager([LowerBottlenecks()]).run(_graph())
    assert any(tmp_path.glob("graph_*/00_fuse_lowrank.after.py"))
    assert "[colafx] fuse_lowrank: fused 1 bottlenecks" in capsys.readouterr().out  # debug prints


def test_bad_pipelines_raise_clear_errors():
    with pytest.raises(ValueError, match="unique"):
        PassManager([Recorder("x", []), Recorder("x", [])])
    with pytest.raises(RuntimeError, match="boom") as info:
        PassManager([Broken()]).run(_graph())
    assert "while running colafx pass 'broken'" in "".join(info.value.__notes__)


def test_tag_recompute_keeps_only_bottleneck_outputs():
    """On a Dynamo graph of a two-block model: bottleneck ops MUST_SAVE, other block ops recompute."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(Bottleneck(d=32, d_out=32), Bottleneck(d=32, d_out=32))
    pipeline = PassManager([LowerBottlenecks(), TagRecompute()])
    summaries = {}

    class Pipeline:
        name = "pipeline"

        def run(self, gm):
            summaries.update({r.name: r.summary for r in pipeline.run(gm)})
            return ""

    _, gm, _ = lowered(model, Pipeline(), torch.randn(2, 32))
    assert summaries["fuse_lowrank"].startswith("fused 2")
    assert summaries["recompute"].startswith("tagged ")
    in_block = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
                and any(path.endswith(("0", "1")) for path, _ in n.meta.get("nn_module_stack", {}).values())]
    assert len(in_block) >= 6
    for node in in_block:  # every op of a block is decided: keep the bottleneck, recompute the rest
        want = CheckpointPolicy.MUST_SAVE if "lowrank_act" in str(node.target) else CheckpointPolicy.PREFER_RECOMPUTE
        assert node.meta.get("recompute") == want, (node.name, node.meta.get("recompute"))
    assert sum("lowrank_act" in str(n.target) for n in in_block) == 2
    # Which tensors the partitioner then keeps is tested end to end in
    # tests/transform/test_backend.py::test_compiled_cola_m_saves_only_rank_r_tensors_and_block_inputs.
