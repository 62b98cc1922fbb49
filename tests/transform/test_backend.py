"""torch.compile(backend="colafx"): found by name, options, numerics vs eager, recompiles.

Tolerances: "aot_eager" runs the same ATen ops as eager (after lowering), compared at 1e-5 abs
(losses, logits, gradients); Inductor generates new kernels (different summation order), at 1e-4.
"""
import copy
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

import colafx
from colafx import presets
from colafx.transform.backend import BackendOptions, colafx_backend, pass_records, register
from tests.llama_plain import PlainLlama

FAST = {"compiler": "aot_eager", "fuse_lowrank": True, "recompute": True}


def counting_backend(options):
    """colafx_backend with ``options`` that remembers every graph it compiled."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return colafx_backend(gm, example_inputs, options=options)

    return backend, graphs


def summaries(graphs) -> dict[str, str]:
    return {r.name: r.summary for gm in graphs for r in pass_records(gm)}


def python_stdout(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; return its stdout split on whitespace."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def cola_tiny(layers=2):
    model = presets.build("llama-tiny", seed=0, num_hidden_layers=layers)
    return colafx.colaify(model, rank=16, generator=torch.Generator().manual_seed(0))


def ids(seq=16, batch=2, seed=0):
    return torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_found_by_name_from_a_fresh_interpreter():
    """The entry point alone makes backend="colafx" work, and importing colafx afterwards (the
    entry point's module registers at import) raises no duplicate-registration error."""
    (ep,) = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "colafx"]
    assert ep.load() is colafx_backend
    code = ("import torch\n"
            "f = torch.compile(lambda x: torch.nn.functional.silu(x) * 2, backend='colafx',"
            " options={'compiler': 'aot_eager'})\n"
            "print(f(torch.zeros(3)).tolist())\n"
            "import colafx.transform.backend as b; b.register(); b.register()\n"
            "from torch._dynamo import list_backends; print('colafx' in list_backends())\n")
    assert python_stdout(code) == ["[0.0,", "0.0,", "0.0]", "True"]
    register()  # idempotent in this process too
    assert torch._dynamo.backends.registry.lookup_backend("colafx") is colafx_backend


def test_import_colafx_registers_when_dynamo_is_loaded():
    """`import colafx` registers "colafx" directly in Dynamo's registry once Dynamo is loaded, and
    does not load Dynamo itself otherwise."""
    code = ("import sys, torch._dynamo\n"
            "from torch._dynamo.backends import registry\n"
            "print('colafx' in registry._COMPILER_FNS)\n"
            "import colafx\n"
            "print('colafx' in registry._COMPILER_FNS)\n")
    assert python_stdout(code) == ["False", "True"]
    assert python_stdout("import sys, colafx; print('torch._dynamo' in sys.modules)") == ["False"]


def test_options_are_validated():
    with pytest.raises(ValueError, match="unknown colafx backend options \\['fuse'\\]"):
        BackendOptions.from_dict({"fuse": True})
    with pytest.raises(ValueError, match="fuse_lowrank"):
        BackendOptions(fuse_lowrank="yes")
    with pytest.raises(ValueError, match="act_bits"):
        BackendOptions(act_bits=4)
    with pytest.raises(ValueError, match="recompute=True needs fuse_lowrank"):
        BackendOptions(recompute=True, fuse_lowrank=False)
    with pytest.raises(ValueError, match="compiler"):
        BackendOptions(compiler="tvm")
    assert BackendOptions.from_dict(None) == BackendOptions()


def _step(model, opt, batch):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = [p.grad.clone() for p in opt.param_groups[0]["params"]]
    opt.step()
    opt.zero_grad()
    return loss.detach(), grads


def test_hf_training_matches_eager_without_recompiling_and_under_no_grad():
    torch._dynamo.reset()
    model = cola_tiny()
    ref = copy.deepcopy(model)
    backend, graphs = counting_backend(FAST)
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for step in range(3):
        loss, grads = _step(compiled, opt, ids(seed=step))
        loss_ref, grads_ref = _step(ref, opt_ref, ids(seed=step))
        torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    assert len(graphs) == 1, "recompiled across training steps at a fixed shape"
    report = summaries(graphs)
    assert report["fuse_lowrank"] == "lowered 14 bottleneck A projections to colafx::lowrank_in (CoLA-M keeps A·x)"
    assert report["recompute"].startswith("tagged ")

    with torch.no_grad():
        logits = compiled(input_ids=ids(seed=9)).logits
        torch.testing.assert_close(logits, ref(input_ids=ids(seed=9)).logits, atol=1e-5, rtol=0)


def test_dynamic_sequence_length_compiles_once():
    torch._dynamo.reset()
    model = cola_tiny(layers=1)
    backend, graphs = counting_backend(FAST)
    compiled = torch.compile(model, backend=backend)
    for seq in (8, 12, 20):
        batch = ids(seq)
        torch._dynamo.mark_dynamic(batch, 1)
        out = compiled(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.testing.assert_close(out.logits, model(input_ids=batch).logits, atol=1e-5, rtol=0)
    assert len(graphs) == 1, f"compiled {len(graphs)} times for 3 sequence lengths"


def test_plain_pytorch_llama_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = PlainLlama(decoy=False)
    x = torch.randint(0, 97, (2, 12))
    colafx.colaify(model, rank=8, example_inputs=(x,), generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(model)
    backend, graphs = counting_backend(FAST)
    out = torch.compile(model, backend=backend)(x)
    expected = ref(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    out.square().mean().backward()
    expected.square().mean().backward()
    for p, p_ref in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4)
    assert summaries(graphs)["fuse_lowrank"] == "lowered 14 bottleneck A projections to colafx::lowrank_in (CoLA-M keeps A·x)"


def test_dense_model_compiles_and_says_nothing_was_found(monkeypatch, tmp_path, capsys):
    """Also COLAFX_DEBUG end to end: it makes the backend dump every graph and print the summaries."""
    torch._dynamo.reset()
    monkeypatch.setenv("COLAFX_DEBUG", str(tmp_path))
    model = presets.build("llama-tiny", seed=0, num_hidden_layers=1)
    backend, graphs = counting_backend({"compiler": "aot_eager", "fuse_lowrank": True})
    batch = ids()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend)(input_ids=batch).logits,
                                   model(input_ids=batch).logits, atol=1e-5, rtol=0)
    report = summaries(graphs)
    assert report["fuse_lowrank"].startswith("found no CoLA bottleneck")
    assert report["quantized"].startswith("found no quantized linear")
    assert f"[colafx] fuse_lowrank: {report['fuse_lowrank']}" in capsys.readouterr().out
    (folder,) = tmp_path.glob("graph_*")
    assert {p.name for p in folder.iterdir()} == {"00_fuse_lowrank.before.py", "00_fuse_lowrank.after.py",
                                                  "01_quantized.before.py", "01_quantized.after.py",
                                                  "summary.txt"}


def test_dump_option_writes_the_pipeline(tmp_path):
    torch._dynamo.reset()
    F = torch.nn.functional

    def bottleneck(x, a, b):  # a hand-written CoLA bottleneck: linear -> SiLU -> linear
        return F.linear(F.silu(F.linear(x, a)), b)

    f = torch.compile(bottleneck, backend="colafx",
                      options={"compiler": "aot_eager", "fuse_lowrank": True, "dump": str(tmp_path)})
    x, a, b = torch.randn(4, 32), torch.randn(8, 32), torch.randn(32, 8)
    torch.testing.assert_close(f(x, a, b), bottleneck(x, a, b), atol=1e-5, rtol=1e-5)
    (folder,) = tmp_path.glob("graph_*")
    assert (folder / "summary.txt").read_text().splitlines() == [
        "[colafx] fuse_lowrank: fused 1 bottlenecks into colafx::lowrank_act",
        "[colafx] quantized: found no quantized linear (int8 dequantize + linear, or colafx quantized ops)"]
    assert "colafx.lowrank_act" in (folder / "00_fuse_lowrank.after.py").read_text()


def test_inductor_forward_backward_matches_eager():
    """The one real Inductor compile (10-20 s on 2 cores): default options plus CoLA-M."""
    torch._dynamo.reset()
    model = cola_tiny(layers=1)
    ref = copy.deepcopy(model)
    batch = ids()
    out = torch.compile(model, backend="colafx", options={"recompute": True})(input_ids=batch, labels=batch)
    expected = ref(input_ids=batch, labels=batch)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-4, rtol=1e-4)
    out.loss.backward()
    expected.loss.backward()
    for p, p_ref in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-3)


def _saved_in_blocks(recompute: bool):
    """Compile a 2-layer CoLA llama-tiny with aot_eager (the min-cut partitioner of Inductor), run one
    training step and return the tensors the partitioned forward saves for backward that were
    computed inside a decoder block: ``[(op, shape)]``."""
    torch._dynamo.reset()
    backend, graphs = counting_backend({**FAST, "recompute": recompute})
    model = cola_tiny()
    batch = ids()
    torch.compile(model, backend=backend)(input_ids=batch, labels=batch).loss.backward()
    (gm,) = graphs
    n_user = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    forward = gm.meta["colafx_forward"]  # outputs: the user's, then the tensors saved for backward
    saved = next(n for n in forward.graph.nodes if n.op == "output").args[0][n_user:]
    found = []
    for node in saved:
        if not isinstance(node, torch.fx.Node) or node.op == "placeholder":
            continue
        paths = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
        if any(".layers." in p for p in paths):
            found.append((str(node.target), tuple(node.meta["val"].shape)))
    return found


def test_compiled_cola_m_saves_only_rank_r_tensors_and_block_inputs():
    """What the partitioned forward of torch.compile(..., options={"recompute": True}) keeps from a
    block: the 7 rank-16 pre-activations A·x per layer and the residual stream between blocks."""
    saved = _saved_in_blocks(recompute=True)
    bottlenecks = [s for s in saved if "lowrank_in" in s[0]]  # A·x: the SiLU backward needs no A rerun
    assert len(bottlenecks) == 2 * 7 and all(shape == (2, 16, 16) for _, shape in bottlenecks)
    rest = [s for s in saved if "lowrank_in" not in s[0]]
    assert len(rest) <= 1 and all(shape == (2, 16, 64) for _, shape in rest), rest  # layer 0's output
    # Without recompute the same step keeps far more of each block (norms, q/k/v, MLP products).
    plain = _saved_in_blocks(recompute=False)
    assert len(plain) > len(saved) + 10
    assert any(shape[-1] == 176 for _, shape in plain)  # d_ff-wide MLP tensors
