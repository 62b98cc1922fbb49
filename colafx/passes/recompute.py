"""CoLA-M recompute boundaries: keep the rank-r bottleneck outputs, recompute the rest of each block.

One policy serves eager and compiled execution:

* :func:`recompute_policy` maps an op to a ``CheckpointPolicy``: ``MUST_SAVE`` for the bottleneck
  ops — ``colafx::lowrank_act`` (``σ(A·x)``, the fused op) and ``colafx::lowrank_in`` (``A·x``,
  what eager CoLA-M runs on the CPU so that neither the recompute nor the SiLU backward repeats the
  A projection) — and ``PREFER_RECOMPUTE`` for everything else. Eager CoLA-M
  (:mod:`colafx.transform.recompute`) hands it to ``create_selective_checkpoint_contexts``.
* :func:`tag_recompute` writes the same decisions into ``node.meta["recompute"]`` (and a per-block
  ``node.meta["ac_graph_id"]``) of a forward or joint FX graph, which is what the min-cut
  partitioner of ``torch.compile`` reads.

Decoder blocks are found without module names by :func:`find_blocks`: the sites' ancestor chains
share a common prefix; when the chains then split into sibling modules of a repeated type (the
layers of a stack) those siblings are the blocks, otherwise the deepest common ancestor is the one
block (a single-layer model).
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

BOTTLENECK_OP = "colafx::lowrank_act"
BOTTLENECK_OPS = (BOTTLENECK_OP, "colafx::lowrank_in")  # σ(A·x) fused, or the pre-activation A·x


def is_bottleneck(target) -> bool:
    """True if ``target`` (an op overload or packet, e.g. an FX node target) is one of the rank-r
    bottleneck ops ``colafx::lowrank_act`` / ``colafx::lowrank_in`` whose outputs CoLA-M keeps."""
    return _op_name(target) in BOTTLENECK_OPS


def _op_name(target) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


def recompute_policy(func) -> CheckpointPolicy:
    """CoLA-M's policy for one op: ``MUST_SAVE`` for a rank-r bottleneck op (see :func:`is_bottleneck`),
    else ``PREFER_RECOMPUTE``."""
    return CheckpointPolicy.MUST_SAVE if is_bottleneck(func) else CheckpointPolicy.PREFER_RECOMPUTE


def find_blocks(chains: Sequence[Sequence[Hashable]], type_of: Callable[[Hashable], object]) -> list:
    """Return the decoder blocks that hold the given sites, in first-seen order.

    ``chains[i]`` lists the ancestors of site ``i`` from the outermost to its direct parent (the site
    itself excluded); ``type_of(ancestor)`` gives the ancestor's module type. Below the common prefix
    of all chains, children that repeat a type are a stack of blocks and all children at that level
    are returned; otherwise the deepest common ancestor is the only block. Sites with an empty chain
    (directly under the root) belong to no block. Returns ``[]`` when no block can be found.
    """
    chains = [tuple(c) for c in chains if len(c)]
    if not chains:
        return []
    depth = 0
    while all(len(c) > depth for c in chains) and len({c[depth] for c in chains}) == 1:
        depth += 1
    children = list(dict.fromkeys(c[depth] for c in chains if len(c) > depth))
    kinds = [type_of(child) for child in children]
    if len(children) >= 2 and len(set(kinds)) < len(kinds):
        return children
    return [chains[0][depth - 1]] if depth else []


def _stack(node: fx.Node) -> list[tuple[str, object]]:
    """``node.meta["nn_module_stack"]`` as ``[(path, type), ...]`` from the outermost module in."""
    return list(node.meta.get("nn_module_stack", {}).values())


def _is_forward(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.meta.get("partitioner_tag") != "is_backward"


def graph_blocks(gm: fx.GraphModule) -> list[str]:
    """The decoder blocks of an FX graph (module paths from ``nn_module_stack``), found from the
    bottleneck nodes with :func:`find_blocks`; ``[]`` if the graph has none."""
    type_of: dict[str, object] = {}
    chains = []
    for node in gm.graph.nodes:
        if _is_forward(node) and is_bottleneck(node.target):
            stack = _stack(node)
            type_of.update(stack)
            # The innermost entries are the CoLA module that calls the op (lowrank_act), or its A
            # projection and the CoLA module (lowrank_in): not ancestors of the site.
            own = 2 if _op_name(node.target) == BOTTLENECK_OPS[1] else 1
            chains.append([path for path, _ in stack[:-own]])
    return find_blocks(chains, type_of.__getitem__)


def tag_recompute(gm: fx.GraphModule) -> int:
    """Tag CoLA-M recompute boundaries on a forward or joint FX graph, in place.

    Every forward bottleneck node (``colafx::lowrank_act`` / ``colafx::lowrank_in``) gets ``node.meta["recompute"] = MUST_SAVE``; every
    other forward node inside a decoder block (per ``nn_module_stack``, see :func:`graph_blocks`)
    gets ``PREFER_RECOMPUTE``. Tagged nodes of a block share ``node.meta["ac_graph_id"]`` (blocks
    numbered from 1 in graph order) so the partitioner saves the tensors passed between blocks.
    Backward nodes of a joint graph and nodes that already carry a ``"recompute"`` tag (e.g. from
    a ``torch.utils.checkpoint`` region traced by Dynamo) are left unchanged.

    Returns:
        the number of nodes tagged (0 when the graph has no bottleneck op).
    """
    blocks = {path: i for i, path in enumerate(graph_blocks(gm), start=1)}
    tagged = 0
    for node in gm.graph.nodes:
        if not _is_forward(node) or "recompute" in node.meta:
            continue
        block = next((blocks[path] for path, _ in _stack(node) if path in blocks), None)
        if is_bottleneck(node.target):
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        elif block is not None:
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
        else:
            continue
        if block is not None:
            node.meta["ac_graph_id"] = block
        tagged += 1
    return tagged
