"""Quantize a model's linears to int4 (a zero point per group of 32 inputs) by round-to-nearest and by
GPTQ, and compare each with the float model on held-out text; save the GPTQ model.

    python examples/quantize_gptq.py                      # llama-tiny, seconds
    python examples/quantize_gptq.py --model smollm2      # SmolLM2-135M, ~2 minutes on 2 cores

Calibration and held-out text are documents of colafx's embedded corpus (Python's documentation),
so nothing is downloaded. Both int4 models have the same format and run the same kernels; GPTQ
only picks other levels. ``colafx export --quant int4 --asymmetric --gptq TEXT`` does the same for
an ONNX file.
"""
import argparse
import copy
import tempfile

import torch

import colafx
from colafx import presets
from colafx.runtime.data import calibration_ids, embedded_corpus
from colafx.transform.quantize import QuantConfig, sqnr_db

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="llama-tiny",
                    help="a preset name, or a path / 'smollm2' for colafx.runtime.models.load_model")
parser.add_argument("--calibration-tokens", type=int, default=4096, help="calibration tokens (windows of 256)")
args = parser.parse_args()

docs = embedded_corpus()
if args.model in presets.names():
    model = presets.build(args.model, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, model.config.vocab_size, (args.calibration_tokens // 256, 256), generator=gen)
    held_out = torch.randint(0, model.config.vocab_size, (4, 256), generator=gen)
else:
    from colafx.runtime.models import load_model, load_tokenizer

    model, tokenizer = load_model(args.model).eval(), load_tokenizer(args.model)
    calibration = calibration_ids(docs[: len(docs) // 2], tokenizer, args.calibration_tokens)
    held_out = calibration_ids(docs[len(docs) // 2:], tokenizer, 1024)  # other documents

widths = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
group = 32 if all(w % 32 == 0 for w in widths) else 16  # llama-tiny's MLP is 176 wide
with torch.no_grad():
    reference = model(held_out).logits
    for algorithm in ("rtn", "gptq"):
        quantized = copy.deepcopy(model)
        config = QuantConfig(weight_bits=4, act_bits=16, group_size=group, symmetric=False, algorithm=algorithm)
        colafx.quantize_(quantized, config, calibration=calibration if algorithm == "gptq" else None)
        logits = quantized(held_out).logits
        top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
        print(f"int4 {algorithm:4s}: logits SQNR vs float {sqnr_db(reference, logits):5.1f} dB, "
              f"top-1 = float {100 * top1:.1f}% on {held_out.numel()} held-out tokens")

folder = tempfile.mkdtemp(prefix="gptq.")
colafx.save(quantized, folder)  # safetensors: packed int4 codes, scales and zero points
print(f"saved the GPTQ model to {folder}")
