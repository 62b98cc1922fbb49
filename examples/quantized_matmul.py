"""Quantize a weight to int8 / int4, run the quantized matmuls, and compare with fp32 F.linear.

    python examples/quantized_matmul.py            # a few seconds on a 2-core CPU

Shows the ``colafx.kernels`` ops: ``quantize_weight`` (per channel or per group, nearest or
stochastic rounding), ``int8_linear`` (W8A8: x is quantized per token inside the op, int8 GEMM with
int32 accumulation) and ``int4_linear`` (packed int4 weights, W4A8 / W4A16; symmetric, or asymmetric
with a zero point per group: onnxruntime's int4 grid), their error (SQNR dB)
against the fp32 product, and their CPU speed next to ``F.linear``. On a GPU the same calls run
the Triton kernels.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from colafx.kernels import dequantize_weight, int4_linear, int8_linear, quantize_weight
from colafx.kernels.qmatmul import cpu_int8_backend
from colafx.transform.quantize import sqnr_db

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dims", type=int, nargs="+", default=[576, 2048], help="weight sizes d (W is [d, d])")
parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128], help="rows of x to time")
parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
args = parser.parse_args()
torch.set_num_threads(args.threads)
gen = torch.Generator().manual_seed(0)


def ms(fn, calls=5):
    """Best time of ``calls`` calls, in milliseconds."""
    fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


# 1. Quantize one weight: int8 per output channel, int4 packed two per byte in groups of 32.
w = torch.randn(512, 512, generator=gen) / 512**0.5
x = torch.randn(64, 512, generator=gen)
q8 = quantize_weight(w, bits=8)                       # qweight int8 [512, 512], scale fp32 [512, 1]
q4 = quantize_weight(w, bits=4, group_size=32)        # qweight uint8 [512, 256], scale [512, 16]
qa = quantize_weight(w, bits=4, group_size=32, symmetric=False)  # + zero int8 [512, 16]: w = (q - zero)·scale
print(f"int8 weight {tuple(q8.qweight.shape)} {q8.qweight.dtype}, int4 weight {tuple(q4.qweight.shape)} "
      f"{q4.qweight.dtype} ({w.numel() * 4 // q4.qweight.numel()}x smaller than fp32 before scales)")

# 2. Stochastic rounding is unbiased: the mean of many seeded roundings converges to w.
mean = sum(dequantize_weight(quantize_weight(w[:4], 4, rounding="stochastic", seed=s)) for s in range(200)) / 200
print(f"int4 |w - deq| nearest {(dequantize_weight(quantize_weight(w[:4], 4)) - w[:4]).abs().mean():.4f}, "
      f"mean of 200 stochastic roundings {(mean - w[:4]).abs().mean():.4f}")

# 3. Quantized matmuls vs the fp32 product.
ref = F.linear(x, w)
for name, out in (("W8A8", int8_linear(x, q8.qweight, q8.scale)),
                  ("W8A16", int8_linear(x, q8.qweight, q8.scale, act_bits=16)),
                  ("W4A8", int4_linear(x, q4.qweight, q4.scale, group_size=32)),
                  ("W4A16", int4_linear(x, q4.qweight, q4.scale, group_size=32, act_bits=16)),
                  ("W4A16 asymmetric", int4_linear(x, qa.qweight, qa.scale, group_size=32, act_bits=16, w_zero=qa.zero))):
    print(f"{name:16s} SQNR vs fp32: {sqnr_db(ref, out):5.1f} dB")

# 4. CPU speed of W8A8 next to fp32 F.linear (see bench/cpu_qmatmul.py for the full, interleaved sweep).
print(f"\nCPU int8 GEMM backend: {cpu_int8_backend()}, {args.threads} thread(s)")
print("| d | tokens | fp32 F.linear ms | W8A8 int8_linear ms | speedup |\n|---|---|---|---|---|")
with torch.no_grad():
    for d in args.dims:
        wd = torch.randn(d, d, generator=gen) / d**0.5
        qd = quantize_weight(wd, bits=8)
        for m in args.tokens:
            xd = torch.randn(m, d, generator=gen)
            t32 = ms(lambda: F.linear(xd, wd))
            t8 = ms(lambda: int8_linear(xd, qd.qweight, qd.scale))
            print(f"| {d} | {m} | {t32:.3f} | {t8:.3f} | {t32 / t8:.2f}x |")
