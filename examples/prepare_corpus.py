"""Prepare a corpus into memory-mapped token shards, then pre-train on it.

    python examples/prepare_corpus.py            # ~1 minute on a 2-core CPU, writes runs/example-prepare-<time>/

Writes the embedded corpus (Python's own documentation) as a C4-style ``.json.gz`` file, trains a
byte-level BPE on it, runs ``colafx prepare`` with two tokenizer processes (what
``colafx prepare FILES --tokenizer T --out DIR --workers 2 --val-tokens 20000`` does), and pre-trains
llama-tiny for a few steps on the shards (``colafx pretrain --data DIR``).
"""
import argparse
import gzip
import json
import time
from pathlib import Path

from colafx.runtime import data
from colafx.runtime.prepare import PrepareConfig, prepare
from colafx.runtime.pretrain import PretrainConfig, train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="pre-training steps on the prepared shards")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    args = parser.parse_args()

    root = Path(f"runs/example-prepare-{time.strftime('%Y%m%d-%H%M%S')}")
    root.mkdir(parents=True)
    docs = data.embedded_corpus()
    with gzip.open(root / "c4-train.00000-of-00001.json.gz", "wt") as f:  # C4's file layout
        f.writelines(json.dumps({"text": d, "url": ""}) + "\n" for d in docs)
    data.train_tokenizer(docs, 4096).save_pretrained(root / "tokenizer")

    index = prepare(PrepareConfig(sources=[str(root / "*.json.gz")], tokenizer=str(root / "tokenizer"),
                                  out=str(root / "shards"), workers=args.workers, shard_tokens=200_000,
                                  val_tokens=20_000))
    print(f"{index['total_tokens']:,} training tokens in {len(index['shards'])} shards ({index['dtype']}), "
          f"{index['val']['tokens']:,} validation tokens")

    result = train(PretrainConfig(preset="llama-tiny", data=[str(root / "shards")], seq_len=64, batch_size=8,
                                  steps=args.steps, eval_every=args.steps, out=str(root / "run")))
    print(f"validation perplexity {result.val_ppl:.1f} after {result.tokens:,} tokens")


if __name__ == "__main__":  # the tokenizer workers are spawned processes
    main()
