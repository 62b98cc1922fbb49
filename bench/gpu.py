"""Validate the GPU path end to end in one command (about 8 minutes on one H100/H200).

    python bench/gpu.py                      # on a CUDA machine: writes bench/results/gpu.json
    python bench/gpu.py --dry-run            # the same code on the CPU at tiny shapes (CI runs this)
    python bench/gpu.py --sections a b       # a subset: a kernels, b kernel speed, c pre-training, d QuZO

(a) the Triton kernels natively (no interpreter) against the pure-PyTorch references on odd shapes,
    bf16/fp16 tolerances: fused ``lowrank_act`` forward and backward, W8A8 / W4A8 / W4A16 linears;
(b) kernel speed against the vendor path, interleaved: W8A8 / W4A8 / W4A16 vs ``F.linear`` in bf16
    (cuBLAS) and ``torch._int_mm``; fused ``lowrank_act`` forward+backward vs unfused ``silu(x @ A.T)``;
(c) pre-training tokens/s and peak memory (``torch.cuda.max_memory_allocated``) for dense, CoLA,
    CoLA-M and compiled CoLA at llama-60m / 350m / 1b, bf16 weights, seq 256, the largest batch
    (halved from a first guess until it fits), with the FLOP ratio beside each;
(d) one QuZO int8 step and one MeZO bf16 step on SmolLM2-135M: time and peak memory.

Targets are printed, never asserted: CoLA/dense tokens/s ≥ the FLOP ratio at 350m and 1b (paper
1.86x); compiled CoLA ≥ 1.3x eager CoLA; CoLA-M peak ≤ 0.5x CoLA at ≤ 1.1x its step time; W8A8 ≥
1.5x bf16 cuBLAS at 4096×4096 with 2048 tokens; fused lowrank_act ≥ unfused. Without CUDA and
without ``--dry-run`` it stops with one line saying so.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dry-run", action="store_true",
                   help="run every section on the CPU at tiny shapes (Triton under TRITON_INTERPRET=1)")
    p.add_argument("--sections", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"],
                   help="sections to run")
    p.add_argument("--presets", nargs="+", default=["llama-60m", "llama-350m", "llama-1b"],
                   help="pre-training sizes for section c (dry run: llama-tiny)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per variant (after 2 warm-ups)")
    p.add_argument("--repeats", type=int, default=20, help="timed kernel calls per variant (median)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for gpu.json")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.dry_run:  # before triton is imported: the kernels then run in its interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from colafx.runtime.device import (environment, peak_memory_bytes, reset_peak_memory,  # noqa: E402
                                   resolve_device, synchronize, timed)
from colafx.files import atomic_write_json  # noqa: E402


def _median_time(fn, device, repeats: int) -> float:
    fn()  # warm-up (autotuning, compilation)
    times = []
    for _ in range(repeats):
        with timed(device, times):
            fn()
    return statistics.median(times)


# -- (a) correctness ------------------------------------------------------------------------------------
def section_a(device, dry: bool) -> list[dict]:
    from colafx.kernels import quantize_weight
    from colafx.kernels.lowrank import lowrank_act_backward_triton, lowrank_act_ref, lowrank_act_triton
    from colafx.kernels.qmatmul import qlinear_ref, qlinear_triton

    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
    dtypes = [torch.float32, torch.bfloat16] if dry else [torch.float32, torch.float16, torch.bfloat16]
    shapes = [(7, 67, 45), (129, 40, 17)] if dry else [(1, 67, 45), (129, 40, 17), (2049, 4096, 1024)]
    rows = []

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    for m, k, n in shapes:
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
            g = torch.randn(m, n, generator=gen).to(device, dtype)
            xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
            ref = lowrank_act_ref(xr, wr, "silu")
            ref.backward(g.float())
            out = lowrank_act_triton(x, w, "silu")
            gx, gw = lowrank_act_backward_triton(g, x, w, "silu")
            errs = [rel(out, ref), rel(gx, xr.grad), rel(gw, wr.grad)]
            rows.append({"kernel": "lowrank_act fwd+bwd", "shape": [m, k, n], "dtype": str(dtype)[6:],
                         "rel_err": max(errs), "tol": 4 * tol[dtype], "ok": max(errs) <= 4 * tol[dtype]})
    for m, k, n in [(7, 64, 48), (129, 128, 96)] if dry else [(1, 4096, 4096), (129, 4096, 1024)]:
        for bits, act_bits, group in ((8, 8, None), (4, 8, 32), (4, 16, 32)):
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16 if not dry else torch.float32)
            q = quantize_weight(torch.randn(n, k, generator=gen).to(device), bits=bits, group_size=group)
            out = qlinear_triton(x, q.qweight, q.scale, None, act_bits, bits)
            ref = qlinear_ref(x, q.qweight, q.scale, None, act_bits, bits)
            err = rel(out, ref)
            limit = 1e-5 if x.dtype == torch.float32 else 3e-2
            rows.append({"kernel": f"W{bits}A{act_bits} linear", "shape": [m, k, n], "dtype": str(x.dtype)[6:],
                         "rel_err": err, "tol": limit, "ok": err <= limit})
    return rows


# -- (b) kernel speed -----------------------------------------------------------------------------------
def section_b(device, dry: bool, repeats: int) -> list[dict]:
    from colafx.kernels import int4_linear, int8_linear, lowrank_act, quantize_act_int8, quantize_weight

    rows = []
    shapes = [(16, 64), (32, 128)] if dry else [(2048, 4096), (128, 4096), (2048, 2048), (16, 4096)]
    fdtype = torch.float32 if dry else torch.bfloat16
    for tokens, d in shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, d, generator=gen).to(device, fdtype)
        w = torch.randn(d, d, generator=gen).to(device, fdtype)
        q8, q4 = quantize_weight(w.float(), bits=8), quantize_weight(w.float(), bits=4, group_size=32)
        variants = {
            "F.linear": lambda: F.linear(x, w),
            "W8A8": lambda: int8_linear(x, q8.qweight, q8.scale, None, act_bits=8),
            "W4A8": lambda: int4_linear(x, q4.qweight, q4.scale, None, act_bits=8, group_size=32),
            "W4A16": lambda: int4_linear(x, q4.qweight, q4.scale, None, act_bits=16, group_size=32),
        }
        if device.type == "cuda":
            qx = quantize_act_int8(x)[0]
            variants["torch._int_mm"] = lambda: torch._int_mm(qx, q8.qweight.t())
        times = {name: _median_time(fn, device, repeats) for name, fn in variants.items()}
        for name, t in times.items():
            rows.append({"op": name, "tokens": tokens, "d": d, "ms": t * 1e3, "vs_F.linear": times["F.linear"] / t})
    for tokens, d, r in [(64, 64, 16)] if dry else [(8192, 2048, 512), (8192, 4096, 1024)]:
        x = torch.randn(tokens, d, device=device, dtype=fdtype, requires_grad=True)
        a = torch.randn(r, d, device=device, dtype=fdtype, requires_grad=True)
        g = torch.randn(tokens, r, device=device, dtype=fdtype)

        def fused():
            lowrank_act(x, a, "silu").backward(g)

        def unfused():
            F.silu(x @ a.t()).backward(g)

        times = {"lowrank_act fused": _median_time(fused, device, repeats),
                 "silu(x @ A.T)": _median_time(unfused, device, repeats)}
        for name, t in times.items():
            rows.append({"op": name, "tokens": tokens, "d": d, "rank": r, "ms": t * 1e3,
                         "vs_unfused": times["silu(x @ A.T)"] / t})
    return rows


# -- (c) pre-training -------------------------------------------------------------------------------------
def section_c(device, dry: bool, presets_: list[str], steps: int) -> list[dict]:
    import copy

    import colafx
    from colafx import presets

    seq, dtype = (32, torch.float32) if dry else (256, torch.bfloat16)
    first_batch = {"llama-tiny": 2, "llama-60m": 256, "llama-350m": 128, "llama-1b": 64}
    rows = []
    for name in (["llama-tiny"] if dry else presets_):
        preset = presets.get(name)
        dense = presets.build(name, seed=0)
        the_plan = colafx.plan(dense, rank=preset.rank, seq_len=seq)
        ratio = the_plan.flops_before / the_plan.flops_after
        cola = colafx.colaify(copy.deepcopy(dense), rank=preset.rank)
        builders = {
            "dense": lambda: copy.deepcopy(dense),
            "CoLA": lambda: copy.deepcopy(cola),
            "CoLA-M": lambda: colafx.enable_recompute(copy.deepcopy(cola)),
            "compiled CoLA": lambda: torch.compile(copy.deepcopy(cola), backend="colafx"),
        }
        for variant, build in builders.items():
            batch = first_batch.get(name, 8)
            while batch >= 1:
                try:
                    row = _train_speed(build().to(device, dtype), batch, seq, steps, device, preset.vocab_size)
                    break
                except torch.OutOfMemoryError:
                    batch //= 2
                    torch.cuda.empty_cache()
            else:
                row = {"error": "out of memory at batch 1"}
            rows.append({"preset": name, "variant": variant, "batch": batch, "seq": seq,
                         "flop_ratio_dense_over_cola": ratio, **row})
    return rows


def _train_speed(model, batch: int, seq: int, steps: int, device, vocab: int) -> dict:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq + 1), device=device)

    def step():
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    reset_peak_memory(device)
    times = []
    for _ in range(steps):
        with timed(device, times):
            step()
    t = statistics.median(times)
    return {"step_s": t, "tokens_per_s": batch * seq / t, "peak_memory_bytes": peak_memory_bytes(device)}


# -- (d) QuZO / MeZO on SmolLM2 ------------------------------------------------------------------------------
def section_d(device, dry: bool) -> list[dict]:
    import copy

    import colafx
    from colafx import presets
    from colafx.runtime.zo import QuZO, zo_targets

    if dry:
        base = presets.build("llama-tiny", seed=0)
    else:
        from colafx.runtime.models import load_model

        base = load_model("smollm2")
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (16, 64), device=device)
    rows = []
    for method in ("quzo-int8", "mezo-bf16"):
        model = copy.deepcopy(base).to(device)
        if method == "quzo-int8":
            colafx.quantize_(model, colafx.QuantConfig(weight_bits=8, act_bits=8, zo_headroom=True))
        else:
            model = model.to(torch.bfloat16 if not dry else torch.float32)
        model.eval().requires_grad_(False)
        opt = QuZO(zo_targets(model, "all"), lr=1e-6, eps=1e-3, method="quzo" if method == "quzo-int8" else "mezo")

        def closure():
            return model(input_ids=ids, labels=ids, use_cache=False).loss

        with torch.no_grad():
            opt.step(closure)  # warm-up
            reset_peak_memory(device)
            times = []
            for _ in range(3):
                with timed(device, times):
                    opt.step(closure)
        rows.append({"method": method, "step_s": statistics.median(times), "peak_memory_bytes": peak_memory_bytes(device)})
    return rows


def _print_tables(result: dict) -> None:
    if "a" in result:
        print("\n(a) kernels vs references")
        print("| kernel | shape | dtype | rel err | tol | ok |\n|---|---|---|---|---|---|")
        for r in result["a"]:
            print(f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['rel_err']:.2e} | {r['tol']:.0e} | {r['ok']} |")
    if "b" in result:
        print("\n(b) kernel speed (median ms)")
        print("| op | tokens | d | ms | vs reference |\n|---|---|---|---|---|")
        for r in result["b"]:
            ref = r.get("vs_F.linear", r.get("vs_unfused"))
            print(f"| {r['op']} | {r['tokens']} | {r['d']} | {r['ms']:.3f} | {ref:.2f}x |")
    if "c" in result:
        print("\n(c) pre-training (median step)")
        print("| preset | variant | batch | tokens/s | peak GiB | vs dense tokens/s | FLOP ratio |\n|---|---|---|---|---|---|---|")
        for r in result["c"]:
            if "error" in r:
                print(f"| {r['preset']} | {r['variant']} | - | {r['error']} | | | |")
                continue
            dense = next(d for d in result["c"] if d["preset"] == r["preset"] and d["variant"] == "dense")
            peak = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r["peak_memory_bytes"] is not None else "n/a (CPU)"
            speed = r["tokens_per_s"] / dense["tokens_per_s"] if "tokens_per_s" in dense else float("nan")
            print(f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {peak} | "
                  f"{speed:.2f}x | {r['flop_ratio_dense_over_cola']:.2f}x |")
    if "d" in result:
        print("\n(d) zeroth-order steps")
        for r in result["d"]:
            peak = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] is not None else "n/a (CPU)"
            print(f"- {r['method']}: {r['step_s']:.3f} s/step, peak {peak}")


def main() -> int:
    args = ARGS
    if args.dry_run:
        device = torch.device("cpu")
    else:
        try:
            device = resolve_device("cuda")
        except ValueError as err:
            print(f"bench/gpu.py: {err} (use --dry-run to run the same code on the CPU)", file=sys.stderr)
            return 1
    start = time.perf_counter()
    result = {"environment": environment(device, "bf16" if not args.dry_run else "fp32"), "dry_run": args.dry_run}
    for section in args.sections:
        t0 = time.perf_counter()
        if section == "a":
            result["a"] = section_a(device, args.dry_run)
        elif section == "b":
            result["b"] = section_b(device, args.dry_run, 3 if args.dry_run else args.repeats)
        elif section == "c":
            result["c"] = section_c(device, args.dry_run, args.presets, 1 if args.dry_run else args.steps)
        else:
            result["d"] = section_d(device, args.dry_run)
        synchronize(device)
        result[f"seconds_{section}"] = time.perf_counter() - t0
    result["seconds"] = time.perf_counter() - start
    print(f"{result['environment']['device_name']} ({device}), torch {torch.__version__}, "
          f"{'dry run' if args.dry_run else 'bf16'}: {result['seconds']:.0f} s; CPU features: "
          f"{' '.join(result['environment']['cpu_features']) or 'none detected'}")
    _print_tables(result)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu_dry_run.json" if args.dry_run else "gpu.json"
    atomic_write_json(args.out / name, result)
    print(f"\nwrote {args.out / name}")
    failed = [r for r in result.get("a", []) if not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
