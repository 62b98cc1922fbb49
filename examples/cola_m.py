"""CoLA-M: keep only the rank-r activations σ(A·x) for backward and recompute the rest of each block.

    python examples/cola_m.py                      # llama-tiny, a few seconds on a CPU
    python examples/cola_m.py --preset llama-60m --seq-len 256
"""
import argparse
import copy

import torch

import colafx
from colafx import presets

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--preset", default="llama-tiny", choices=presets.names(), help="model size")
parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
parser.add_argument("--steps", type=int, default=10, help="training steps of the CoLA-M model on random tokens")
args = parser.parse_args()

model = presets.build(args.preset, seed=0)
colafx.colaify(model, rank=presets.get(args.preset).rank)       # CoLA: B·σ(A·x) everywhere
cola_m = colafx.enable_recompute(copy.deepcopy(model))           # same weights, CoLA-M per block
ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len),
                    generator=torch.Generator().manual_seed(0))


def kept_for_backward(m):
    """MiB allocated by the forward pass and still alive when backward starts (profiler events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = m(input_ids=ids, labels=ids).loss
    kept = sum(e.self_cpu_memory_usage for e in prof.events()) / 2**20
    loss.backward()
    return loss.item(), kept


(loss_a, mib_a), (loss_b, mib_b) = kept_for_backward(model), kept_for_backward(cola_m)
worst = max(((p.grad - q.grad).norm() / p.grad.norm()).item()
             for p, q in zip(model.parameters(), cola_m.parameters()))
print(f"CoLA   : loss {loss_a:.6f}, {mib_a:7.1f} MiB kept for backward")
print(f"CoLA-M : loss {loss_b:.6f}, {mib_b:7.1f} MiB kept for backward, worst relative gradient "
      f"difference {worst:.1e}")

opt = torch.optim.AdamW(cola_m.parameters(), lr=presets.get(args.preset).lr)
for step in range(args.steps):
    opt.zero_grad(set_to_none=True)
    loss = cola_m(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    if step % 5 == 0 or step == args.steps - 1:
        print(f"step {step:3d}  loss {loss.item():.3f}")

colafx.disable_recompute(cola_m)                                # back to plain CoLA blocks
print("generate:", cola_m.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)[0].tolist())
