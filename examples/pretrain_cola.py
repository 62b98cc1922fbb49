"""Pre-train a small CoLA LLaMA on the embedded corpus (Python's own docs), then load it and generate.

    python examples/pretrain_cola.py                     # llama-tiny, about a minute on a 2-core CPU
    python examples/pretrain_cola.py --dense             # the dense baseline, for comparison
    torchrun --nproc_per_node 2 -m colafx.cli pretrain --preset llama-tiny --steps 60   # data-parallel

The same run from the command line: ``colafx pretrain --preset llama-tiny --steps 60 --out runs/tiny``.
"""
import argparse
import time

import torch

import colafx
from colafx.runtime import data
from colafx.runtime.pretrain import PretrainConfig, train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dense", action="store_true", help="train the dense model instead of CoLA")
parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
parser.add_argument("--out", default=None,
                    help="run folder (default: a new runs/example-pretrain-<time>, so the example can be rerun)")
args = parser.parse_args()

out = args.out or f"runs/example-pretrain-{time.strftime('%Y%m%d-%H%M%S')}"
config = PretrainConfig(preset="llama-tiny", dense=args.dense, steps=args.steps, seq_len=64, batch_size=8,
                        eval_every=max(args.steps // 3, 1), eval_blocks=64, out=out)
result = train(config)   # data=None: the embedded corpus; a byte-level BPE is trained and saved with the run
print(f"validation perplexity {result.val_ppl:.1f} after {result.tokens:,} tokens "
      f"({result.tokens_per_s:,.0f} tok/s); curves in {result.out / 'curves.png'}")

model = colafx.load(result.out / "model")            # CoLA structure rebuilt from colafx.json
tokenizer = data.load_any_tokenizer(result.out)
ids = tokenizer("The for statement", return_tensors="pt")["input_ids"]
# A model this small trained this briefly repeats its most frequent token (a newline) under greedy
# decoding, so sample: the text shows which words and spellings it has picked up.
torch.manual_seed(0)
out = model.generate(ids, max_new_tokens=30, do_sample=True, temperature=0.8, top_k=40)
print(repr(tokenizer.decode(out[0])))
