"""Plan and apply CoLA to a LLaMA preset, train a few steps, generate, save and reload.

    python examples/colaify_llama.py            # llama-tiny, a few seconds on a CPU
"""
import argparse
import tempfile

import torch

import colafx
from colafx import presets

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--preset", default="llama-tiny", choices=presets.names(), help="model size")
parser.add_argument("--rank", type=float, default=0.25, help="CoLA rank as a fraction of d_model")
parser.add_argument("--steps", type=int, default=20, help="training steps on random tokens")
args = parser.parse_args()

model = presets.build(args.preset, seed=0)
print(colafx.plan(model, rank=args.rank).summary())       # dry run: nothing changes yet
colafx.colaify(model, rank=args.rank)                     # in place: q,k,v,o,gate,up,down -> B·σ(A·x)

vocab = model.config.vocab_size
ids = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
for step in range(args.steps):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 5 == 0 or step == args.steps - 1:
        print(f"step {step:3d}  loss {loss.item():.3f}")

print("generate:", model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)[0].tolist())
with tempfile.TemporaryDirectory() as out:
    colafx.save(model, out)
    again = colafx.load(out)
    same = torch.equal(again(ids).logits, model(ids).logits)
    print(f"saved to {out} and reloaded: identical logits = {same}")
