"""Export a CoLA model (and an int8 copy) to ONNX and generate with onnxruntime's KV cache,
one prompt and a left-padded batch of two.

    python examples/export_onnx.py                    # llama-tiny, under a minute on a CPU
    python examples/export_onnx.py --model smollm2    # SmolLM2-135M: "The capital of France is" ...
"""
import argparse
import copy
import tempfile
from pathlib import Path

import torch

import colafx
from colafx import presets
from colafx.runtime import OnnxCausalLM

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="llama-tiny",
                    help="a preset name, or a path / 'smollm2' for colafx.runtime.models.load_model")
parser.add_argument("--rank", type=float, default=0.25, help="CoLA rank as a fraction of d_model")
parser.add_argument("--tokens", type=int, default=12, help="tokens to generate")
args = parser.parse_args()

if args.model in presets.names():
    model, tokenizer = presets.build(args.model, seed=0), None
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
else:
    from colafx.runtime.models import load_model, load_tokenizer

    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids

colafx.colaify(model, rank=args.rank, init="svd")          # q,k,v,o,gate,up,down -> B·σ(A·x)
int8 = colafx.quantize_(copy.deepcopy(model), colafx.QuantConfig(weight_bits=8, act_bits=8))

with tempfile.TemporaryDirectory() as out:
    for name, m, quant in (("cola", model, None), ("cola-int8", int8, "int8")):
        path = colafx.export_onnx(m, Path(out) / name / "model.onnx", quant=quant, tokenizer=tokenizer)
        lm = OnnxCausalLM(path)                            # onnxruntime session + metadata
        got = lm.generate(ids, max_new_tokens=args.tokens)  # prefill once, then one token per call
        ref = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, do_sample=False)
        text = tokenizer.decode(got[0, ids.shape[1]:]) if tokenizer else got[0, ids.shape[1]:].tolist()
        size = path.stat().st_size / 2**20
        print(f"{name:10s} {size:7.2f} MiB  greedy tokens == PyTorch: {torch.equal(got, ref)}  -> {text!r}")
        # a batch of two prompts of different lengths: left-pad the short one, pass the mask
        short = ids[:, -3:]
        batch = torch.cat([ids, torch.cat([torch.zeros_like(ids[:, 3:]), short], dim=1)])
        mask = torch.cat([torch.ones_like(ids), torch.cat([torch.zeros_like(ids[:, 3:]), torch.ones_like(short)], 1)])
        padded = lm.generate(batch, max_new_tokens=args.tokens, attention_mask=mask)
        alone = lm.generate(short, max_new_tokens=args.tokens)
        print(f"{'':10s} padded batch of 2 == each prompt alone: "
              f"{torch.equal(padded[0], got[0]) and torch.equal(padded[1, ids.shape[1] - 3:], alone[0])}")
