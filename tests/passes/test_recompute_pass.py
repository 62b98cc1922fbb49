"""The CoLA-M graph pass: block discovery, tags on a joint graph, and what the partitioner then saves."""
import copy

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from functorch.compile import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch.utils.checkpoint import CheckpointPolicy

import colafx
from colafx.passes.recompute import find_blocks, graph_blocks, is_bottleneck, recompute_policy, tag_recompute
from colafx.transform.modules import CoLALinear
from tests.llama_plain import PlainLlama


def test_policy_and_op_matching():
    import colafx.kernels.lowrank  # noqa: F401  registers colafx::lowrank_act

    op = torch.ops.colafx.lowrank_act
    assert is_bottleneck(op) and is_bottleneck(op.default)
    assert not is_bottleneck(torch.ops.aten.mm.default) and not is_bottleneck(torch.mm)
    assert recompute_policy(op.default) == CheckpointPolicy.MUST_SAVE
    assert recompute_policy(torch.ops.aten.silu.default) == CheckpointPolicy.PREFER_RECOMPUTE


class Layer:  # stand-in module types for find_blocks
    pass


class Attn:
    pass


class Mlp:
    pass


TYPES = {"m": object, "m.l0": Layer, "m.l1": Layer, "m.l0.a": Attn, "m.l0.f": Mlp, "m.l1.a": Attn, "m.l1.f": Mlp}


@pytest.mark.parametrize("chains, blocks", [
    ([["m", "m.l0", "m.l0.a"], ["m", "m.l0", "m.l0.f"], ["m", "m.l1", "m.l1.a"]], ["m.l0", "m.l1"]),  # stack
    ([["m", "m.l0", "m.l0.a"], ["m", "m.l0", "m.l0.f"]], ["m.l0"]),  # one layer: attention + MLP differ in type
    ([["m", "m.l0", "m.l0.a"]], ["m.l0.a"]),  # one site: its parent
    ([[], []], []),  # sites directly under the root belong to no block
    ([], []),
])
def test_find_blocks(chains, blocks):
    assert find_blocks(chains, TYPES.__getitem__) == blocks


def _loss(model, ids):
    torch.manual_seed(3)  # same dropout masks in every run
    logits, value = model(ids)
    return logits.logsumexp(-1).mean() + value.pow(2).mean()


def _compile_and_partition(model, ids):
    """Compile with AOT autograd; the partition function runs the pass on the joint graph, then the
    min-cut partitioner. Returns (grads, joint graph, tagged-node count, names saved for backward)."""
    seen = {}

    def partition(joint, inputs, **kwargs):
        seen["tagged"] = tag_recompute(joint)
        fw, bw = min_cut_rematerialization_partition(joint, inputs, **kwargs)
        seen["joint"] = joint
        seen["saved"] = {n.name for n in bw.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")}
        return fw, bw

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           bw_compiler=lambda gm, _: make_boxed_func(gm.forward), partition_fn=partition)
    torch._dynamo.reset()
    _loss(torch.compile(model, backend=backend), ids).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return grads, seen["joint"], seen["tagged"], seen["saved"]


@pytest.mark.parametrize("tags_from", ["pass", "eager_policy"])
def test_compiled_partition_keeps_only_bottlenecks(tags_from):
    """Tags from tag_recompute (model not wrapped) or from enable_recompute's policy traced by Dynamo:
    either way the partitioner saves the bottlenecks and recomputes attention; gradients match eager."""
    torch.manual_seed(0)
    model = PlainLlama(dropout=0.1)
    colafx.colaify(model, rank=8, example_inputs=(torch.zeros(1, 16, dtype=torch.long),))
    if tags_from == "pass":
        for m in model.modules():
            if isinstance(m, CoLALinear):
                m.fused = True  # the bottleneck appears as colafx::lowrank_act
    else:
        colafx.enable_recompute(model)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    eager = copy.deepcopy(model)
    _loss(eager, ids).backward()

    grads, joint, tagged, saved = _compile_and_partition(model, ids)

    assert [path.rsplit(".", 1)[-1] for path in graph_blocks(joint)] == ["0", "1"]
    bottlenecks = [n for n in joint.graph.nodes if n.op == "call_function" and is_bottleneck(n.target)]
    assert len(bottlenecks) == 14
    assert all(n.meta["recompute"] == CheckpointPolicy.MUST_SAVE for n in bottlenecks)
    assert {n.name for n in bottlenecks} <= saved
    recomputed = [n for n in joint.graph.nodes if n.meta.get("recompute") == CheckpointPolicy.PREFER_RECOMPUTE]
    assert any("scaled_dot_product" in str(n.target) for n in recomputed)  # attention is recomputed
    assert not {n.name for n in recomputed} & saved  # ... and nothing tagged for recompute is saved
    if tags_from == "pass":
        assert tagged > 100 and {n.meta["ac_graph_id"] for n in recomputed} == {1, 2}
    else:
        assert tagged == 0  # Dynamo already tagged every node of the checkpointed blocks
    assert tag_recompute(joint) == 0  # existing tags are left alone
    for name, g in grads.items():
        torch.testing.assert_close(g, eager.get_parameter(name).grad, rtol=1e-6, atol=1e-8, msg=name)


def test_pass_ignores_graphs_without_bottleneck():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.SiLU()))
    assert tag_recompute(gm) == 0
    assert not any("recompute" in n.meta for n in gm.graph.nodes)
