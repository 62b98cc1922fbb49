"""An ordered pipeline of FX graph passes with one-line summaries and optional graph dumps.

A pass is a small object with a ``name`` and a ``run(gm) -> str`` that changes ``gm`` in place and
returns a one-line summary of what it changed ("fused 56 bottlenecks", "found no ...").
:class:`PassManager` runs the passes in order, prints or logs the summaries, and with a dump
folder (``COLAFX_DEBUG=1`` or ``dump=dir``) writes each graph's code before and after every pass.
"""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch.fx as fx

from colafx.files import atomic_write_bytes

log = logging.getLogger("colafx.passes")

DEBUG_ENV = "COLAFX_DEBUG"
DEFAULT_DUMP_DIR = "colafx_debug"
_graph_ids = itertools.count()  # numbers the graphs of one process, so dumps never overwrite


class GraphPass(Protocol):
    """What the pipeline needs from a pass."""

    name: str

    def run(self, gm: fx.GraphModule) -> str:
        """Rewrite ``gm`` in place; return a one-line summary of what changed."""


@dataclass
class PassRecord:
    """What one pass did to one graph."""

    name: str
    summary: str

    def __str__(self) -> str:
        return f"[colafx] {self.name}: {self.summary}"


def debug_dump_dir() -> Path | None:
    """The dump folder that ``COLAFX_DEBUG`` asks for: unset / "0" -> None, "1" -> ./colafx_debug,
    anything else is taken as the folder path."""
    value = os.environ.get(DEBUG_ENV, "").strip()
    if value in ("", "0", "false", "False"):
        return None
    return Path(DEFAULT_DUMP_DIR if value in ("1", "true", "True") else value)


def graph_code(gm: fx.GraphModule) -> str:
    """Readable Python code of ``gm`` (with shapes where the graph has them)."""
    return gm.print_readable(print_output=False)


class TagRecompute:
    """CoLA-M: mark recompute boundaries (``node.meta["recompute"]``) for the min-cut partitioner."""

    name = "recompute"

    def run(self, gm: fx.GraphModule) -> str:
        """Call :func:`colafx.passes.recompute.tag_recompute`.

        Raises:
            ImportError: if this colafx build has no ``colafx.passes.recompute`` module.
        """
        from colafx.passes.recompute import tag_recompute

        tagged = tag_recompute(gm)
        if not tagged:
            return "found no CoLA bottleneck to cut at; nothing tagged"
        return f"tagged {tagged} nodes for recompute (only rank-r activations stay saved)"


class PassManager:
    """Run ``passes`` in order over a graph; see the module docstring.

    ``dump``: folder for before/after graph dumps (default: from ``COLAFX_DEBUG``). ``verbose``:
    print the summaries (default: when dumping); they are always logged to ``colafx.passes``.
    """

    def __init__(self, passes: list[GraphPass], dump: str | os.PathLike | None = None,
                 verbose: bool | None = None):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"pass names must be unique, got {names}")
        self.passes = list(passes)
        self.dump = Path(dump) if dump is not None else debug_dump_dir()
        self.verbose = self.dump is not None if verbose is None else verbose

    def run(self, gm: fx.GraphModule) -> list[PassRecord]:
        """Run every pass on ``gm`` in place and return what each one did.

        Raises:
            whatever a pass raises, with the pass name added to the message's notes; OSError if the
            dump folder cannot be written.
        """
        folder = self._graph_folder()
        records = []
        for i, graph_pass in enumerate(self.passes):
            stem = f"{i:02d}_{graph_pass.name}"
            if folder is not None:
                _write_text(folder / f"{stem}.before.py", graph_code(gm))
            try:
                summary = graph_pass.run(gm)
            except Exception as err:
                err.add_note(f"while running colafx pass {graph_pass.name!r}")
                raise
            gm.graph.lint()
            gm.recompile()
            if folder is not None:
                _write_text(folder / f"{stem}.after.py", graph_code(gm))
            record = PassRecord(graph_pass.name, summary)
            records.append(record)
            log.info("%s", record)
            if self.verbose:
                print(record, flush=True)
        if folder is not None:
            _write_text(folder / "summary.txt", "".join(f"{r}\n" for r in records))
        return records

    def _graph_folder(self) -> Path | None:
        if self.dump is None:
            return None
        folder = self.dump / f"graph_{next(_graph_ids):03d}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))
