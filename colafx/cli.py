"""The ``colafx`` command line: ``colafx plan | prepare | pretrain | finetune | export``.

Each sub-command lives next to the code it runs: the module named in ``COMMANDS`` provides
``add_arguments(parser)`` and ``run_cli(args) -> int``; it is imported only when that command runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "plan": ("colafx.cli", "dry-run colaify on a preset or model: per-projection ranks, params, FLOPs"),
    "prepare": ("colafx.runtime.prepare", "tokenize a corpus into memory-mapped token shards for pretrain"),
    "pretrain": ("colafx.runtime.pretrain", "pre-train a LLaMA with CoLA (or dense) and report perplexity"),
    "finetune": ("colafx.runtime.finetune", "fine-tune with QuZO / MeZO (forward passes only) or AdamW"),
    "export": ("colafx.runtime.export", "export a model to ONNX for onnxruntime inference"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``colafx plan``."""
    from colafx import presets
    from colafx.transform.colaify import RANK_HELP

    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=presets.names(), help="plan a preset (built on the meta device: no memory)")
    src.add_argument("--model", help="plan a Hugging Face model folder or colafx checkpoint")
    parser.add_argument("--rank", action="append", default=None, metavar="[ROLE=]R",
                        help=RANK_HELP + " (default: the preset's paper rank, else 0.25)")
    parser.add_argument("--act", choices=["silu", "identity"], default="silu", help="bottleneck activation")
    parser.add_argument("--seq-len", type=int, default=256, help="sequence length for attention FLOPs (default 256)")
    parser.add_argument("--exclude", nargs="*", default=None, help="module names or suffixes to keep dense")
    parser.add_argument("--summary", action="store_true", help="print the totals only, not one row per projection")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``colafx plan``: print the plan table and totals."""
    from colafx import presets
    from colafx.transform.colaify import parse_rank, plan

    rank = parse_rank(args.rank) if args.rank else None
    if args.preset:
        model = presets.build(args.preset, device="meta")
        rank = rank if rank is not None else presets.get(args.preset).rank
    else:
        from colafx.runtime.models import load_model

        model = load_model(args.model)
        rank = rank if rank is not None else 0.25
    p = plan(model, rank=rank, act=args.act, exclude=args.exclude, seq_len=args.seq_len)
    print(p.summary() if args.summary else p.table())
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported for its arguments."""
    parser = argparse.ArgumentParser(prog="colafx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=_DefaultsFormatter)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" unless the help text already says what the default is, the flag is
    required, or there is no default."""

    def _get_help_string(self, action):
        if "default" in (action.help or "").lower() or action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``colafx`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    args = build_parser(command).parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run_cli(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"colafx {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
