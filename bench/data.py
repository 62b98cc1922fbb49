"""Pre-training data at scale: ``colafx prepare`` throughput and peak memory, and the loader's share
of a training step.

    python bench/data.py                                  # 8 / 32 / 128 MB, 1 and 2 workers (~22 min, 2 busy cores)
    python bench/data.py --sizes-mb 10 100 1000           # the issue's sizes, on a machine with time for them
    python bench/data.py --sizes-mb 0.05 0.1 0.2 --workers 1 --no-peer --preset llama-tiny --steps 1  # smoke

Corpora are WikiText-2's training lines (``COLAFX_DATA`` or ``../shared/data``), shuffled with a
fixed seed per copy and grouped 4 lines to a document, as JSON lines with a ``text`` field, up to each
size. For every size and worker count the bench runs, interleaved, ``colafx prepare`` and the peer a
user would pick instead: the nanoGPT recipe (``datasets.load_dataset("json")`` + ``Dataset.map`` with
``num_proc`` + one ``np.memmap`` ``uint16`` file). Each run is its own process tree; its peak memory is
the sum of the tree's proportional set sizes (PSS: pages shared between processes split among them)
sampled every 20 ms with psutil, and, exactly, the largest single process's peak RSS (``ru_maxrss``).
The tokenizer (``--tokenizer``, default SmolLM2's: 49,152 ids, ``uint16``) is saved as a Hugging Face
folder first.

The loader section reads ``batch(step)`` from the largest prepared corpus (all its shards) and times
it against one llama-small CoLA training step at the same batch (interleaved), with nanoGPT's
``get_batch`` (random windows of the peer's ``train.bin``) beside it.

Targets (printed, never asserted): peak memory (tree PSS) at the largest size ≤ 1.2x the middle
size's; the loader ≤ 1% of a llama-small step; throughput grows with workers. Writes
``bench/results/data.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINES_PER_DOC = 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--sizes-mb", type=float, nargs=3, default=[8, 32, 128], metavar=("SMALL", "MIDDLE", "LARGE"),
                   help="corpus sizes in MB (10^6 bytes of JSON lines)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    p.add_argument("--shard-tokens", type=int, default=2_000_000,
                   help="colafx prepare --shard-tokens (its buffer: the memory that does not depend on the corpus)")
    p.add_argument("--tokenizer", default="smollm2",
                   help="tokenizer (anything --tokenizer of colafx prepare takes; default: SmolLM2's)")
    p.add_argument("--no-peer", action="store_true", help="skip the nanoGPT-recipe peer (datasets.map)")
    p.add_argument("--steps", type=int, default=10, help="timed loader / training steps (interleaved)")
    p.add_argument("--preset", default="llama-small", help="model whose CoLA training step the loader is timed against")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length (pretrain's default)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (pretrain's default)")
    p.add_argument("--data", type=Path, default=None, help="folder holding wikitext-2/train.txt "
                   "(default: $COLAFX_DATA or ../shared/data)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for data.json")
    p.add_argument("--peer-run", nargs=4, metavar=("SRC", "TOKENIZER", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- corpora ----------------------------------------------------------------------------------------------
def build_corpus(wiki: Path, size_mb: float, path: Path) -> dict:
    """JSON lines of shuffled WikiText-2 lines (4 to a document) up to ``size_mb`` MB."""
    lines = [line.strip() for line in wiki.read_text(encoding="utf-8").splitlines() if line.strip()]
    want, written, docs, copy = int(size_mb * 1e6), 0, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < want:
            order = lines[:]
            random.Random(copy).shuffle(order)
            for i in range(0, len(order), LINES_PER_DOC):
                row = json.dumps({"text": "\n".join(order[i:i + LINES_PER_DOC])}) + "\n"
                f.write(row)
                written += len(row.encode("utf-8"))
                docs += 1
                if written >= want:
                    break
            copy += 1
    return {"bytes": written, "docs": docs}


# -- measuring one process tree -----------------------------------------------------------------------------
_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def measure(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` in a fresh wrapper process: wall seconds, peak tree RSS (psutil, sampled) and the
    largest single process's ru_maxrss. Raises RuntimeError with the stderr tail on failure."""
    try:
        import psutil
    except ImportError:
        psutil = None
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    peak = [0]

    def sample():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(_rss(p) for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.02)
    sampler = threading.Thread(target=sample, daemon=True) if psutil else None
    if sampler:
        sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if sampler:
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{err[-3000:]}")
    maxrss_kb = int(next(line.split()[1] for line in err.splitlines() if line.startswith("MAXRSS")))
    return {"seconds": seconds, "peak_rss_tree_mb": peak[0] / 1e6 if psutil else None,
            "peak_rss_largest_mb": maxrss_kb * 1024 / 1e6, "stdout": out}


def _rss(p) -> int:
    """Proportional set size (shared pages split among the processes sharing them, so the tree's sum
    is its real footprint), or RSS where PSS is not available."""
    try:
        info = p.memory_full_info()
        return getattr(info, "pss", info.rss)
    except Exception:  # noqa: BLE001 - a process that just exited
        return 0


def prepare_cmd(src: Path, tok: Path, out: Path, workers: int, shard_tokens: int) -> list[str]:
    return [sys.executable, "-m", "colafx.cli", "prepare", str(src), "--tokenizer", str(tok), "--out", str(out),
            "--workers", str(workers), "--shard-tokens", str(shard_tokens), "--no-progress"]


def peer_cmd(src: Path, tok: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--peer-run", str(src), str(tok), str(out), str(workers)]


def peer_run(src: str, tok_dir: str, out: str, workers: int) -> None:
    """nanoGPT's data/openwebtext/prepare.py recipe on a local JSON-lines file: load_dataset, map
    (tokenize + EOS, num_proc workers), then write every id into one uint16 memmap in 64 batches."""
    import numpy as np
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    eos = tok.eos_token_id
    out = Path(out)
    ds = load_dataset("json", data_files=src, split="train", cache_dir=str(out / "hf_cache"))

    def process(batch):
        ids = [row + [eos] for row in tok(batch["text"], add_special_tokens=False)["input_ids"]]
        return {"ids": ids, "len": [len(r) for r in ids]}
    ds = ds.map(process, batched=True, remove_columns=["text"], num_proc=workers if workers > 1 else None)
    total = int(np.sum(ds["len"], dtype=np.uint64))
    arr = np.memmap(out / "train.bin", dtype=np.uint16, mode="w+", shape=(total,))
    idx, shards = 0, min(64, len(ds))
    for i in range(shards):
        batch = ds.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
        chunk = np.concatenate(batch["ids"])
        arr[idx:idx + len(chunk)] = chunk
        idx += len(chunk)
    arr.flush()
    print(f"TOKENS {total}")


# -- loader vs a training step ---------------------------------------------------------------------------
def loader_section(prepared: Path, peer_bin: Path, args, vocab: int) -> list[dict]:
    """Median seconds of ``PreparedCorpus.batch`` (on ``prepared``), nanoGPT's ``get_batch`` (on the
    peer's ``train.bin`` of the same corpus, or colafx's first shard with --no-peer) and one CoLA
    training step, interleaved over ``args.steps`` steps."""
    import numpy as np
    import torch

    from colafx.runtime import data as D
    from colafx.runtime import pretrain as P

    corpus = D.PreparedCorpus(prepared, args.seq_len, seed=0)
    gen = torch.Generator().manual_seed(0)

    def nanogpt_batch():  # nanoGPT's train.py get_batch: a fresh memmap of train.bin per batch
        data = np.memmap(peer_bin, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - args.seq_len - 1, (args.batch_size,), generator=gen)
        return torch.stack([torch.from_numpy(data[i:i + args.seq_len + 1].astype(np.int64)) for i in ix])

    config = P._resolve_recipe(P.PretrainConfig(preset=args.preset, seq_len=args.seq_len, batch_size=args.batch_size,
                                                device="cpu", progress=False))
    model, plan = P.build_model(config, vocab)
    model = P._apply_transforms(model, config, plan)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    step_name = f"{args.preset} CoLA step"
    times = {"colafx PreparedCorpus.batch": [], "nanoGPT get_batch (memmap)": [], step_name: []}
    stride = max(1, len(corpus) // (args.batch_size * (args.steps + 2)))
    for step in range(args.steps + 2):  # 2 warm-ups
        at = step * stride  # spread over the corpus, all shards touched
        t0 = time.perf_counter()
        blocks = corpus.batch(at, args.batch_size, 0, 1)
        t1 = time.perf_counter()
        nanogpt_batch()
        t2 = time.perf_counter()
        P._train_step(model, optimizer, blocks, config, step)
        t3 = time.perf_counter()
        if step >= 2:
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(dt)
    step_s = statistics.median(times[step_name])
    return [{"what": k, "median_ms": statistics.median(v) * 1e3, "share_of_step": statistics.median(v) / step_s}
            for k, v in times.items()]


# -- main -------------------------------------------------------------------------------------------------
def main() -> int:
    args = parse_args()
    if args.peer_run:
        src, tok, out, workers = args.peer_run
        peer_run(src, tok, out, int(workers))
        return 0
    import torch

    from colafx.files import atomic_write_json
    from colafx.runtime import data as D
    from colafx.runtime import prepare as PR
    from colafx.runtime.device import cpu_features, environment

    data = args.data or Path(os.environ.get("COLAFX_DATA", ROOT.parent / "shared" / "data"))
    wiki = data / "wikitext-2" / "train.txt"
    if not wiki.is_file():
        print(f"bench/data.py: {wiki} not found; pass --data or set COLAFX_DATA", file=sys.stderr)
        return 1
    print(f"CPU features: {' '.join(cpu_features()) or 'none detected'}; {os.cpu_count()} logical CPUs; "
          f"torch {torch.__version__}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="colafx-bench-data-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    try:
        tok_dir = work / "tokenizer"
        tokenizer = D.load_any_tokenizer(args.tokenizer)
        tokenizer.save_pretrained(tok_dir)
        rows, kept = [], {}
        for size in args.sizes_mb:
            src = work / f"corpus-{size:g}MB.jsonl"
            info = build_corpus(wiki, size, src)
            print(f"corpus {size:g} MB: {info['bytes']:,} bytes, {info['docs']:,} documents", flush=True)
            for workers in args.workers:
                tools = ["colafx prepare"] + ([] if args.no_peer else ["nanoGPT recipe (datasets.map)"])
                for tool in tools:
                    out = work / f"out-{size:g}-{workers}-{tool.split()[0]}"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir()
                    cmd = (prepare_cmd(src, tok_dir, out, workers, args.shard_tokens) if tool == "colafx prepare"
                           else peer_cmd(src, tok_dir, out, workers))
                    m = measure(cmd, env)
                    tokens = (json.loads((out / "index.json").read_text())["total_tokens"] if tool == "colafx prepare"
                              else int(m["stdout"].split("TOKENS")[1].split()[0]))
                    row = {"size_mb": size, "bytes": info["bytes"], "workers": workers, "tool": tool,
                           "tokens": tokens, "seconds": m["seconds"], "mb_per_s": info["bytes"] / 1e6 / m["seconds"],
                           "tokens_per_s": tokens / m["seconds"],
                           "tokens_per_s_per_worker": tokens / m["seconds"] / workers,
                           "peak_rss_tree_mb": m["peak_rss_tree_mb"], "peak_rss_largest_mb": m["peak_rss_largest_mb"]}
                    rows.append(row)
                    print(_row_line(row), flush=True)
                    if size == args.sizes_mb[-1] and workers == args.workers[0]:
                        kept[tool] = out
                    else:
                        shutil.rmtree(out, ignore_errors=True)
            src.unlink()
        largest = kept["colafx prepare"]
        peer_bin = (kept["nanoGPT recipe (datasets.map)"] / "train.bin" if not args.no_peer
                    else largest / PR.read_index(largest)["shards"][0]["file"])
        loader = loader_section(largest, peer_bin, args, len(tokenizer))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"environment": environment(torch.device("cpu")), "cpu_count": os.cpu_count(),
              "sizes_mb": args.sizes_mb, "shard_tokens": args.shard_tokens, "lines_per_doc": LINES_PER_DOC,
              "tokenizer": f"{args.tokenizer} ({len(tokenizer):,} ids)", "prepare": rows, "loader": loader,
              "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "unset (enabled)"),
              "loader_setup": {"preset": args.preset, "seq_len": args.seq_len, "batch_size": args.batch_size,
                               "steps": args.steps}, "targets": targets(rows, loader, args)}
    print(table(rows, loader, result["targets"], args))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "data.json", result)
    print(f"-> {args.out / 'data.json'}")
    return 0


def _row_line(r: dict) -> str:
    return (f"  {r['tool']}, {r['workers']} worker(s): {r['seconds']:.1f} s, {r['mb_per_s']:.2f} MB/s, "
            f"{r['tokens_per_s']:,.0f} tokens/s, peak PSS {r['peak_rss_tree_mb'] or 0:.0f} MB (tree)")


def targets(rows: list[dict], loader: list[dict], args) -> dict:
    mine = [r for r in rows if r["tool"] == "colafx prepare"]
    small, middle, large = args.sizes_mb

    def peak(size):
        return max(r["peak_rss_tree_mb"] or r["peak_rss_largest_mb"] for r in mine if r["size_mb"] == size)
    speed = {w: statistics.mean(r["tokens_per_s"] for r in mine if r["workers"] == w) for w in args.workers}
    return {"rss_large_over_middle": peak(large) / peak(middle),
            "loader_share_of_step": loader[0]["share_of_step"],
            "throughput_ratio_most_over_fewest_workers": speed[max(speed)] / speed[min(speed)]}


def table(rows: list[dict], loader: list[dict], t: dict, args) -> str:
    lines = ["", "| corpus | tool | workers | MB/s | tokens/s | tokens/s per worker | peak PSS, tree (MB) | "
             "peak RSS, largest process (MB) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size_mb']:g} MB | {r['tool']} | {r['workers']} | {r['mb_per_s']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_worker']:,.0f} | "
                     f"{r['peak_rss_tree_mb'] or float('nan'):.0f} | {r['peak_rss_largest_mb']:.0f} |")
    lines += ["", f"| loader ({args.preset}, batch {args.batch_size} x {args.seq_len + 1} tokens) | median ms | "
              "share of a CoLA step |", "|---|---:|---:|"]
    lines += [f"| {r['what']} | {r['median_ms']:.3f} | {r['share_of_step']:.2%} |" for r in loader]
    lines += ["", f"targets: peak memory (tree PSS) {args.sizes_mb[2]:g} MB / {args.sizes_mb[1]:g} MB = "
              f"{t['rss_large_over_middle']:.2f}x (target <= 1.2x); loader = {t['loader_share_of_step']:.3%} of a step "
              f"(target <= 1%); tokens/s {max(args.workers)} vs {min(args.workers)} worker(s) = "
              f"{t['throughput_ratio_most_over_fewest_workers']:.2f}x (target > 1)"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
