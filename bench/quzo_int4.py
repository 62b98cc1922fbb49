"""Why QuZO int4 did not learn: the SPSA signal against its noise, per quantization of the base.

    python bench/quzo_int4.py                   # SmolLM2-135M, one SST-2 batch of 16, CPU (~10 min)

For each base (fp32, W8A8, W4A8 / W4A16 per channel with ZO head-room, W4A8 per group) it prints:

* the base's quality: candidates loss and accuracy on 64 held-out SST-2 training prompts;
* LoRA (float adapters on that base): for ``--directions`` seeds u, the two-point difference
  ``D = L(θ+εu) − L(θ−εu)`` against ``2ε·∇L·u`` from autograd (straight-through through the
  quantized forward): their correlation over the seeds, and the median |D| (the signal);
* full-parameter int4/int8 (integer weights perturbed on their grid): the share of weights the
  stochastically rounded perturbation moves, the correlation of ``D`` with ``2ε·∇L·u`` (float
  gradient of the dequantized model) and with a second ``D`` that uses another rounding of the same
  u (the rounding noise floor), and ``E|lr·g·u/s|``: the expected share of non-zero updates.

Writes ``quzo_int4.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

BASES = {  # name -> QuantConfig kwargs (None: fp32)
    "fp32": None,
    "w8a8": dict(weight_bits=8, act_bits=8, zo_headroom=True),
    "w4a8": dict(weight_bits=4, act_bits=8, zo_headroom=True),
    "w4a16": dict(weight_bits=4, act_bits=16, zo_headroom=True),
    "w4a8-nohead": dict(weight_bits=4, act_bits=8),
    "w4a8-g64": dict(weight_bits=4, act_bits=8, group_size=64, zo_headroom=True),
    "w4a8-g64-nohead": dict(weight_bits=4, act_bits=8, group_size=64),
    "w4a8-g32-nohead": dict(weight_bits=4, act_bits=8, group_size=32),
}


def corr(a, b) -> float:
    """Pearson correlation of two equal-length lists (nan if either is constant)."""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = (a.norm() * b.norm()).item()
    return float((a * b).sum() / den) if den > 0 else float("nan")


def noise_to_signal(diffs, exact) -> float:
    """RMS of the part of D that ``2ε·∇L·u`` does not explain, over the RMS of ``2ε·∇L·u``."""
    d, g = torch.tensor(diffs, dtype=torch.float64), torch.tensor(exact, dtype=torch.float64)
    return float((d - g).pow(2).mean().sqrt() / g.pow(2).mean().sqrt())


def lora_signal(model, loss_fn, eps: float, directions: int) -> dict:
    """Two-point differences of LoRA adapters vs their autograd directional derivatives."""
    from colafx.kernels.zo import normal_noise, zo_perturb_
    from colafx.runtime.zo import zo_targets

    params = zo_targets(model, "lora")
    for p in params:
        p.requires_grad_(True)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params)
    for p in params:
        p.requires_grad_(False)
    diffs, exact = [], []
    with torch.no_grad():
        for d in range(directions):
            seeds = [1000 * d + i for i in range(len(params))]
            exact.append(2 * eps * sum(float((g.flatten() * normal_noise(s, g.numel())).sum())
                                       for g, s in zip(grads, seeds)))
            for p, s in zip(params, seeds):
                zo_perturb_(p.data, s, eps)
            lp = float(loss_fn())
            for p, s in zip(params, seeds):
                zo_perturb_(p.data, s, -2 * eps)
            lm = float(loss_fn())
            for p, s in zip(params, seeds):
                zo_perturb_(p.data, s, eps)
            diffs.append(lp - lm)
    return {"loss": float(loss), "corr_D_vs_grad": corr(diffs, exact), "noise_to_signal": noise_to_signal(diffs, exact),
            "median_abs_D": statistics.median(abs(x) for x in diffs),
            "median_abs_2eps_grad_u": statistics.median(abs(x) for x in exact), "D": diffs, "2eps_grad_u": exact}


def float_twin(model):
    """A float copy of a quantized model: every QuantLinear replaced by an nn.Linear of its dequantized weight."""
    from colafx.transform.colaify import _set_submodule
    from colafx.transform.quantize import quantized_modules

    twin = copy.deepcopy(model)
    for name, m in quantized_modules(twin).items():
        lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        lin.weight.data = m.dequantized_weight()
        if m.bias is not None:
            lin.bias.data = m.bias.float()
        _set_submodule(twin, name, lin)
    return twin


def full_int_signal(model, loss_fn_of, eps: float, lrs, directions: int) -> dict:
    """Full-parameter QuZO on integer weights: perturbation sparsity, D vs gradient, rounding noise floor."""
    from colafx.kernels.quant import derive_seed
    from colafx.kernels.zo import ZO_QMAX, normal_noise, zo_perturb_int_
    from colafx.transform.quantize import quantized_modules

    mods = list(quantized_modules(model).items())
    twin = float_twin(model)
    weights = [twin.get_submodule(n).weight for n, _ in mods]
    for w in weights:
        w.requires_grad_(True)
    grads = torch.autograd.grad(loss_fn_of(twin), weights)
    del twin
    diffs, diffs2, exact, moved, total, update_share = [], [], [], 0, 0, {lr: [] for lr in lrs}
    with torch.no_grad():
        for d in range(directions):
            seeds = [1000 * d + i for i in range(len(mods))]
            exact.append(2 * eps * sum(float((g.flatten() * normal_noise(s, g.numel())).sum())
                                       for g, s in zip(grads, seeds)))
            pair = []
            for salt in (1, 2):  # two independent roundings of the same u
                for (_, m), s in zip(mods, seeds):
                    zo_perturb_int_(m.qweight, m.scale, s, eps, +1, m.bits, rounding_seed=derive_seed(s, 10 + salt))
                lp = float(loss_fn_of(model))
                for (_, m), s in zip(mods, seeds):
                    zo_perturb_int_(m.qweight, m.scale, s, eps, -2, m.bits, rounding_seed=derive_seed(s, 10 + salt))
                lm = float(loss_fn_of(model))
                for (_, m), s in zip(mods, seeds):
                    zo_perturb_int_(m.qweight, m.scale, s, eps, +1, m.bits, rounding_seed=derive_seed(s, 10 + salt))
                pair.append(lp - lm)
            diffs.append(pair[0])
            diffs2.append(pair[1])
            g = abs(pair[0]) / (2 * eps)
            for (_, m), s in zip(mods[:4], seeds[:4]):  # a sample of layers for the step statistics
                u = normal_noise(s, m.out_features * m.in_features).view(m.out_features, m.in_features)
                step = eps * u / m.scale.repeat_interleave(m.in_features // m.scale.shape[1], dim=1)
                moved += int((step.abs() > torch.rand_like(step)).sum())  # |SR(step)| >= 1 with prob |step|
                total += step.numel()
                for lr in lrs:
                    update_share[lr].append(float((lr * g * step.abs() / eps).clamp(max=1).mean()))
    qmax = ZO_QMAX[mods[0][1].bits]
    return {"perturbed_share": moved / total, "corr_D_vs_grad": corr(diffs, exact),
            "noise_to_signal": noise_to_signal(diffs, exact),
            "corr_D_two_roundings": corr(diffs, diffs2), "median_abs_D": statistics.median(abs(x) for x in diffs),
            "median_abs_2eps_grad_u": statistics.median(abs(x) for x in exact), "qmax": qmax,
            "nonzero_update_share": {str(lr): statistics.mean(v) for lr, v in update_share.items()},
            "D": diffs, "D_other_rounding": diffs2, "2eps_grad_u": exact}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model path or 'smollm2'")
    parser.add_argument("--data-dir", default=os.environ.get("COLAFX_DATA", "../shared/data"),
                        help="folder holding SST-2/train.tsv")
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES), help="bases to measure")
    parser.add_argument("--directions", type=int, default=8, help="random directions u per measurement")
    parser.add_argument("--eps", type=float, default=1e-2, help="LoRA perturbation scale")
    parser.add_argument("--int-eps", type=float, default=1e-3, help="full-parameter integer perturbation scale")
    parser.add_argument("--full", nargs="*", default=["w8a8", "w4a8"], help="bases to measure full-parameter QuZO on")
    parser.add_argument("--out", default="bench/results", help="folder for quzo_int4.json")
    args = parser.parse_args(argv)

    from colafx.files import atomic_write_json
    from colafx.runtime import tasks
    from colafx.runtime.device import cpu_features
    from colafx.runtime.lora import add_lora_
    from colafx.runtime.models import load_model, load_tokenizer
    from colafx.transform.quantize import QuantConfig, quantize_

    print("CPU features:", cpu_features(), flush=True)
    base, tok = load_model(args.model).eval(), load_tokenizer(args.model)
    folder = Path(args.data_dir) / "SST-2"
    examples = tasks.read_examples(folder / "train.tsv", tasks.SST2)
    held = tasks.sample_per_class(examples[-2000:], 32, 1)
    batch = tasks.sample_per_class(examples[:-2000], 8, 0)

    def loss_of(model, exs=batch):
        return tasks.label_loss(model, tok, tasks.SST2, exs, "candidates")

    results = {}
    for name in args.bases:
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        if BASES[name]:
            quantize_(model, QuantConfig(**BASES[name]))
        with torch.no_grad():
            quality = {"heldout_loss": statistics.mean(float(loss_of(model, held[i:i + 32])) for i in range(0, 64, 32)),
                       "heldout_acc": tasks.accuracy(model, tok, tasks.SST2, held)}
        r = {"quality": quality}
        if name in args.full:
            r["full"] = full_int_signal(model, loss_of, args.int_eps, (1e-6, 1e-5, 1e-4), args.directions)
        add_lora_(model, 8, 16.0, 0)
        with torch.random.fork_rng():  # B = 0 at init makes A's derivative vanish: start from a trained-like B
            torch.manual_seed(0)
            for n, p in model.named_parameters():
                if "lora_b" in n:
                    p.data.normal_(0, 1e-3)
        r["lora"] = lora_signal(model, functools.partial(loss_of, model), args.eps, args.directions)
        results[name] = r
        f = r.get("full", {})
        print(f"{name}: held-out loss {quality['heldout_loss']:.3f} acc {quality['heldout_acc']:.3f} | LoRA "
              f"corr(D, 2e g.u) {r['lora']['corr_D_vs_grad']:+.2f} noise/signal {r['lora']['noise_to_signal']:.2f} med|D| {r['lora']['median_abs_D']:.2e} "
              f"med|2e g.u| {r['lora']['median_abs_2eps_grad_u']:.2e}"
              + (f" | full: moved {f['perturbed_share']:.4f} corr(D, grad) {f['corr_D_vs_grad']:+.2f} "
                 f"noise/signal {f['noise_to_signal']:.2f} "
                 f"corr(D, D') {f['corr_D_two_roundings']:+.2f} med|D| {f['median_abs_D']:.2e} "
                 f"med|2e g.u| {f['median_abs_2eps_grad_u']:.2e} nonzero-update {f['nonzero_update_share']}"
                 if f else "") + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        del model
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "quzo_int4.json", {"args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
