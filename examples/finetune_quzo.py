"""QuZO: fine-tune an int8 model on its integer grid with forward passes only (SST-2-style prompts).

    python examples/finetune_quzo.py                        # SmolLM2-135M, about a minute on a CPU
    python examples/finetune_quzo.py --preset llama-tiny    # random-init tiny model, a few seconds

Quantizes every projection to int8 (W8A8), prints the logits' SQNR against fp32 and the storage
ratio, checks that perturb / restore is bit-exact, then runs a few QuZO steps on a dozen embedded
movie-review sentences and prints the loss and accuracy before and after.
"""
import argparse
import copy

import torch

import colafx
from colafx.runtime import QuZO, tasks
from colafx.runtime.zo import zo_targets
from colafx.transform.quantize import quantized_modules, sqnr_db

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
src = parser.add_mutually_exclusive_group()
src.add_argument("--model", default="smollm2", help="'smollm2', a HF folder, a .gguf file or a colafx checkpoint")
src.add_argument("--preset", help="a random-init preset (byte tokenizer) instead of --model")
parser.add_argument("--bits", type=int, default=8, choices=[8, 4], help="weight bits")
parser.add_argument("--steps", type=int, default=10, help="QuZO steps")
parser.add_argument("--lr", type=float, default=1e-6, help="learning rate")
parser.add_argument("--eps", type=float, default=1e-3, help="perturbation scale")
args = parser.parse_args()

SENTENCES = [("a gorgeous , witty , seductive movie .", 1), ("the plot is nothing but boilerplate .", 0),
             ("an utterly charming and hilarious film .", 1), ("a dull , lifeless mess .", 0),
             ("one of the best films of the year .", 1), ("it 's a bad sign when you 're rooting for the villain .", 0),
             ("smart , funny and touching .", 1), ("tedious and pretentious .", 0),
             ("a triumph of imagination .", 1), ("the acting is wooden and the jokes fall flat .", 0),
             ("warm , moving and beautifully made .", 1), ("an exhausting , joyless experience .", 0)]
examples = [tasks.Example({"sentence": s}, label) for s, label in SENTENCES]
task = tasks.SST2  # "{sentence} It was" + " terrible" / " great"

if args.preset:
    model, tokenizer = colafx.presets.build(args.preset, seed=0).eval(), tasks.ByteTokenizer()
else:
    from colafx.runtime.models import load_model, load_tokenizer

    model, tokenizer = load_model(args.model).eval(), load_tokenizer(args.model)
reference = copy.deepcopy(model)
fp32_bytes = {n: m.weight.numel() * 4 for n, m in model.named_modules() if type(m) is torch.nn.Linear}

colafx.quantize_(model, colafx.QuantConfig(weight_bits=args.bits, act_bits=8, zo_headroom=True))
q_bytes = sum(t.numel() * t.element_size() for m in quantized_modules(model).values()
              for t in (m.qweight, m.scale))
batch = tasks.encode_pairs(tokenizer, [task.prompt(e) for e in examples], [task.label_words[e.label] for e in examples])
with torch.no_grad():
    sqnr = sqnr_db(tasks.scored_logits(reference, batch), tasks.scored_logits(model, batch))
ratio = q_bytes / sum(fp32_bytes[n] for n in quantized_modules(model))
print(f"W{args.bits}A8 label logits: SQNR {sqnr:.1f} dB vs fp32; quantized projections {ratio:.3f}x fp32 bytes")
del reference

optimizer = QuZO(zo_targets(model, "all"), lr=args.lr, eps=args.eps, method="quzo", seed=0)
codes = [m.qweight.clone() for m in optimizer.targets]
optimizer._perturb(0, +1), optimizer._perturb(0, -2), optimizer._perturb(0, +1)  # +εu, −2εu, +εu
assert all(torch.equal(a, m.qweight) for a, m in zip(codes, optimizer.targets)), "restore was not bit-exact"
print("perturb +eps·u, -2eps·u, +eps·u restores every integer weight bit-exactly")


def report(tag):
    with torch.no_grad():
        loss = float(tasks.label_loss(model, tokenizer, task, examples))
    print(f"{tag}: label loss {loss:.4f}, accuracy {tasks.accuracy(model, tokenizer, task, examples):.3f}")


report("before")
for step in range(args.steps):
    loss = optimizer.step(lambda: tasks.label_loss(model, tokenizer, task, examples))
    print(f"step {step + 1}: mean loss of the two queries {loss:.4f}, projected gradient {optimizer.last_grads[0]:+.3f}")
report("after ")
print("weights are still", sorted({str(m.qweight.dtype) for m in optimizer.targets}))
