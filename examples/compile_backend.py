"""torch.compile(model, backend="colafx"): colafx's graph passes, then Inductor.

    python examples/compile_backend.py                  # llama-tiny, 1 layer: 1-2 min on 2 CPU cores
    python examples/compile_backend.py --no-recompute   # without the CoLA-M recompute tags
    COLAFX_DEBUG=1 python examples/compile_backend.py   # also dump graphs to ./colafx_debug

Colaifies a small Llama, compiles it with the "colafx" backend, prints what each pass did, and
checks that the compiled training step gives the eager loss and gradients.
"""
import argparse
import copy
import time

import torch

import colafx
from colafx import presets

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--preset", default="llama-tiny", choices=presets.names(), help="model size")
parser.add_argument("--layers", type=int, default=1, help="decoder layers (fewer compile faster)")
parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (batch of 2)")
parser.add_argument("--no-recompute", action="store_true", help="leave out CoLA-M recompute tagging")
parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"],
                    help="inductor generates kernels; aot_eager only partitions (fast, for debugging)")
args = parser.parse_args()

model = presets.build(args.preset, seed=0, num_hidden_layers=args.layers)
colafx.colaify(model, rank=presets.get(args.preset).rank, generator=torch.Generator().manual_seed(0))
eager = copy.deepcopy(model)                                   # same weights, runs uncompiled

options = {"recompute": not args.no_recompute, "compiler": args.compiler, "verbose": True}
compiled = torch.compile(model, backend="colafx", options=options)   # passes print "[colafx] ..."
ids = torch.randint(0, model.config.vocab_size, (2, args.seq_len), generator=torch.Generator().manual_seed(0))

start = time.perf_counter()
loss = compiled(input_ids=ids, labels=ids).loss
loss.backward()
print(f"first compiled step (includes compilation): {time.perf_counter() - start:.1f} s")
loss_eager = eager(input_ids=ids, labels=ids).loss
loss_eager.backward()

worst = max(((p.grad - q.grad).norm() / q.grad.norm()).item()
            for p, q in zip(model.parameters(), eager.parameters()))
print(f"loss compiled {loss.item():.6f}  eager {loss_eager.item():.6f}  "
      f"|diff| {abs(loss.item() - loss_eager.item()):.1e}; worst relative gradient difference {worst:.1e}")
torch.testing.assert_close(loss, loss_eager, atol=1e-4, rtol=1e-4)   # Inductor reorders sums

with torch.no_grad():                                          # inference: a second graph, no recompute
    same = torch.allclose(compiled(input_ids=ids).logits, eager(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
print("no_grad logits match eager:", same)
