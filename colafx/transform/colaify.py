"""``plan()`` and ``colaify()``: turn the dense projections of a model into CoLA auto-encoders.

``plan`` is the dry run: it captures the model, finds its projections by dataflow, applies
``targets``/``exclude`` and the rank rules, and validates everything. ``colaify`` executes the plan
in place, so Hugging Face features (``generate``, ``save_pretrained``, gradient checkpointing) keep
working on the returned model.
"""
from __future__ import annotations

import collections
import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from colafx.passes.capture import capture
from colafx.passes.projections import ALL_ROLES, BLOCK_ROLES, ATTN_INPUT_ROLES, Site, find_projections
from colafx.passes.recompute import find_blocks
from colafx.transform.modules import (ACTIVATIONS, INITS, CoLALinear, cola_param_count,
                                      dense_param_count, resolve_rank)

RankSpec = int | float | Mapping[str, int | float]
Patterns = str | Iterable[str] | None


@dataclass
class PlannedSite:
    """A discovered projection and what the plan does with it (``rank is None``: stays dense)."""

    site: Site
    rank: int | None
    note: str = ""  # why the site stays dense, or how its rank was chosen (a cap)

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def role(self) -> str:
        return self.site.role

    @property
    def params_before(self) -> int:
        s = self.site
        return dense_param_count(s.d_in, s.d_out, s.bias) * s.count

    @property
    def params_after(self) -> int:
        s = self.site
        return self.params_before if self.rank is None else cola_param_count(s.d_in, s.d_out, self.rank, s.bias)

    @property
    def flops_before(self) -> float:
        return self.site.flops_per_token

    @property
    def flops_after(self) -> float:
        s = self.site
        if self.rank is None:
            return self.flops_before
        return 2.0 * self.rank * (s.d_in + s.d_out) * s.rows_per_token


@dataclass
class Plan:
    """The result of :func:`plan`: every projection site, its role and planned rank, and totals.

    ``params_*`` count all parameters of the model; ``flops_*`` are forward FLOPs per token of all
    matmuls (projections, logits head and attention) at the captured sequence length.
    """

    sites: list[PlannedSite]
    d_model: int
    seq_len: int
    act: str
    init: str
    model_params: int
    other_flops: float

    @property
    def targets(self) -> list[PlannedSite]:
        """The sites that become CoLA modules."""
        return [s for s in self.sites if s.rank is not None]

    @property
    def missed(self) -> list[PlannedSite]:
        """Projections inside a decoder block whose dataflow matched no attention or MLP pattern and
        that were not selected by ``targets``: they stay dense, and ``colaify`` warns about them."""
        return [s for s in self.sites if s.rank is None and s.role == "other" and s.note]

    @property
    def notes(self) -> list[str]:
        """One line per site with a note: missed projections, experts kept dense, capped ranks."""
        return [f"{s.name}: {s.note}" for s in self.sites if s.note]

    @property
    def params_before(self) -> int:
        return self.model_params

    @property
    def params_after(self) -> int:
        return self.model_params - sum(s.params_before - s.params_after for s in self.targets)

    @property
    def flops_before(self) -> float:
        return sum(s.flops_before for s in self.sites) + self.other_flops

    @property
    def flops_after(self) -> float:
        return sum(s.flops_after for s in self.sites) + self.other_flops

    def summary(self) -> str:
        """Totals only: parameters and FLOPs/token before and after, and their ratios."""
        return (f"parameters: {self.params_before:,} -> {self.params_after:,} "
                f"({self.params_before / self.params_after:.2f}x fewer)\n"
                f"forward FLOPs/token (seq {self.seq_len}): {self.flops_before / 1e6:,.2f}M -> "
                f"{self.flops_after / 1e6:,.2f}M ({self.flops_before / self.flops_after:.2f}x fewer)\n"
                f"{len(self.targets)} of {len(self.sites)} projections -> CoLA (act={self.act}, "
                f"init={self.init}), d_model={self.d_model}"
                + (f"\nWARNING: {len(self.missed)} projections inside decoder blocks matched no attention/MLP "
                   f"pattern and stay dense: {_names(self.missed)}" if self.missed else ""))

    def table(self) -> str:
        """One row per projection, then the totals."""
        head = ("module", "role", "shape", "rank", "params", "params CoLA", "MFLOP/tok", "MFLOP/tok CoLA")
        rows = [head]
        for s in self.sites:
            rows.append((s.name, s.role, f"{s.site.d_in}x{s.site.d_out}", "dense" if s.rank is None else str(s.rank),
                         f"{s.params_before:,}", f"{s.params_after:,}",
                         f"{s.flops_before / 1e6:.3f}", f"{s.flops_after / 1e6:.3f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        notes = "".join(f"\n  {n}" for n in self.notes)
        return "\n".join(lines) + ("\n\nnotes:" + notes if notes else "") + "\n\n" + self.summary()

    def __str__(self) -> str:
        return self.table()


def plan(model: nn.Module, rank: RankSpec = 0.25, act: str = "silu", init: str = "cola",
         targets: Patterns = None, exclude: Patterns = None, example_inputs=None,
         roles: Iterable[str] | None = None, seq_len: int = 256, strict: bool = False) -> Plan:
    """Dry-run ``colaify``: find the projections and decide the rank of each, changing nothing.

    Args:
        rank: an int, a float fraction of d_model (paper default 1/4), or a dict keyed by role
            (``"q"``, ``"down"`` ...), by regex on the module name, or ``"default"``. A fraction that
            gives more than a site's min(d_in, d_out) (e.g. 1/2 on the narrow k/v of a GQA model) is
            capped there, with a note; an explicit int that is too large is an error.
        act: bottleneck activation, ``"silu"`` (paper) or ``"identity"``.
        init: ``"cola"`` (the paper's random init) or ``"svd"`` (truncated SVD of the weights).
        targets / exclude: PEFT matching rules: a string is a regex ``fullmatch`` on the module
            name, a list matches exact names or ``.``-suffixes. Without ``targets``, every attention
            and MLP projection (``roles``) is converted.
        example_inputs: inputs for capture; needed for models that are not Hugging Face LMs.
        roles: the roles to convert when ``targets`` is None (default: all attention and MLP roles).
        seq_len: sequence length of the captured example (attention FLOPs depend on it).
        strict: raise instead of noting projections that sit inside a decoder block but match no
            attention or MLP pattern (``Plan.missed``).

    Raises:
        ValueError: already-colaified model, unknown act/init/role, bad rank (≤ 0, or an int above
            min(d_in, d_out)), targets that match nothing, no projections found, a selected
            projection that is not an ``nn.Linear``, or (``strict``) a missed projection. The model
            is never modified.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown act {act!r}; choose one of {ACTIVATIONS}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    if any(isinstance(m, CoLALinear) for m in model.modules()):
        raise ValueError("model is already colaified (it contains CoLALinear modules); "
                         "colaify a fresh dense model instead")
    roles = _check_roles(roles)
    captured = capture(model, example_inputs, seq_len)
    sites, other_flops = find_projections(captured)
    if not sites:
        raise ValueError(f"no dense projections (linear layers with 2-D parameter weights) found in "
                         f"{type(model).__name__}")
    d_model = _d_model(sites)
    selected = _select(sites, targets, exclude, roles)
    rank_of = _rank_rules(rank, selected, d_model)
    block_of = _blocks_of(sites, model)
    planned = []
    for site in sites:
        r, note = rank_of.get(site.param, (None, ""))
        if r is not None:
            _check_site(model, site, r)
        elif site.role == "experts":
            note = (f"{site.count} stacked experts ({site.d_in}x{site.d_out} each) kept dense; colafx does not "
                    "convert 3-D expert weights, and their FLOPs are not counted")
        elif site.role == "other" and block_of(site.name):
            note = (f"inside decoder block {block_of(site.name)} but its dataflow matches no attention or MLP "
                    "pattern: kept dense (name it in targets=[...] to convert it)")
        planned.append(PlannedSite(site, r, note))
    model_params = sum(p.numel() for p in model.parameters())
    result = Plan(planned, d_model, captured.seq_len, act, init, model_params, other_flops)
    if strict and result.missed:
        raise ValueError(f"strict: {len(result.missed)} projections inside decoder blocks match no attention or "
                         f"MLP pattern: {_names(result.missed)}")
    return result


def colaify(model: nn.Module, rank: RankSpec = 0.25, act: str = "silu", init: str = "cola",
            targets: Patterns = None, exclude: Patterns = None, example_inputs=None,
            roles: Iterable[str] | None = None, recompute: bool = False,
            generator: torch.Generator | None = None, strict: bool = False) -> nn.Module:
    """Replace the model's attention and MLP projections with CoLA auto-encoders, in place.

    Arguments are those of :func:`plan`; ``recompute=True`` also enables CoLA-M
    (:func:`colafx.enable_recompute`); ``generator`` seeds the ``"cola"`` init. Projections inside a
    decoder block that match no attention/MLP pattern stay dense with a ``UserWarning`` naming them
    (``strict=True``: a ``ValueError`` before anything changes).

    Returns:
        the same ``model`` object, modified.

    Raises:
        ValueError: see :func:`plan`; nothing is changed when it raises.
    """
    the_plan = plan(model, rank, act, init, targets, exclude, example_inputs, roles, strict=strict)
    if the_plan.missed:
        warnings.warn(f"colaify left {len(the_plan.missed)} projections inside decoder blocks dense: their dataflow "
                      f"matches no attention or MLP pattern: {_names(the_plan.missed)} (name them in targets=[...] "
                      "to convert them; strict=True makes this an error)", stacklevel=2)
    apply_plan(model, the_plan, generator)
    if recompute:
        from colafx.transform.recompute import enable_recompute

        enable_recompute(model)
    return model


def apply_plan(model: nn.Module, the_plan: Plan, generator: torch.Generator | None = None) -> nn.Module:
    """Swap every planned site of ``the_plan`` for a :class:`CoLALinear` (in place)."""
    for planned in the_plan.targets:
        linear = model.get_submodule(planned.name)
        cola = CoLALinear.from_linear(linear, planned.rank, the_plan.act, the_plan.init, planned.role, generator)
        cola.train(linear.training)
        _set_submodule(model, planned.name, cola)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


RANK_HELP = ("CoLA rank: an int, or a float fraction of d_model (capped per projection at min(d_in, d_out)); "
             "repeat with ROLE=R or REGEX=R for per-role rules, e.g. --rank 0.5 --rank k=96 --rank v=96")


def parse_rank(texts: str | Iterable[str]) -> RankSpec:
    """Parse command-line rank rules: ``"0.25"``, ``"128"``, or ``"ROLE_OR_REGEX=VALUE"`` items, e.g.
    ``["0.5", "k=96", "v=96"]`` -> ``{"default": 0.5, "k": 96, "v": 96}``. A single plain value is
    returned as a number.

    Raises:
        ValueError: a value that is not an int or a float, or two plain values.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    rules: dict[str, int | float] = {}
    for text in texts:
        key, sep, value = text.rpartition("=")
        key = key.strip() if sep else "default"
        if key in rules:
            raise ValueError(f"rank rule {key!r} given twice ({texts})")
        rules[key] = _number(value.strip(), text)
    if list(rules) == ["default"]:
        return rules["default"]
    return rules


def _number(value: str, text: str) -> int | float:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"rank must be an int, a float or ROLE=VALUE, got {text!r}") from None


def matches(patterns: Patterns, name: str) -> bool:
    """PEFT's target matching: a string is a regex ``fullmatch``; a list matches exact names or
    ``.``-suffixes."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _check_roles(roles) -> tuple[str, ...]:
    if roles is None:
        return BLOCK_ROLES
    roles = tuple([roles] if isinstance(roles, str) else roles)
    unknown = [r for r in roles if r not in ALL_ROLES]
    if unknown:
        raise ValueError(f"unknown roles {unknown}; known roles are {ALL_ROLES}")
    return roles


def _select(sites: list[Site], targets: Patterns, exclude: Patterns, roles) -> list[Site]:
    if targets is None:
        chosen = [s for s in sites if s.role in roles]
        if not chosen:
            found = collections.Counter(s.role for s in sites)
            raise ValueError(f"no attention or MLP projections found (roles found: {dict(found)}); "
                             "is this a transformer? Name them with targets=[...]")
    else:
        chosen = [s for s in sites if matches(targets, s.name)]
        if not chosen:
            raise ValueError(f"targets {targets!r} match none of the projections "
                             f"(e.g. {[s.name for s in sites[:4]]})")
    kept = [s for s in chosen if not matches(exclude, s.name)]
    if not kept:
        raise ValueError(f"exclude {exclude!r} removes every selected projection")
    return kept


def _rank_rules(rank: RankSpec, sites: list[Site], d_model: int) -> dict[str, tuple[int, str]]:
    """``{param: (rank, note)}`` for the selected sites; fractions are capped per site (with a note)."""
    if not isinstance(rank, Mapping):
        return {s.param: _site_rank(rank, s, d_model) for s in sites}
    rules = dict(rank)
    for key in rules:
        if key == "default" or key in ALL_ROLES:
            continue
        try:
            pattern = re.compile(key)
        except re.error as err:
            raise ValueError(f"rank key {key!r} is neither a role {ALL_ROLES} nor a valid regex: {err}") from None
        if not any(pattern.fullmatch(s.name) for s in sites):
            raise ValueError(f"rank key {key!r} is not a known role {ALL_ROLES} and matches no selected "
                             "module name")
    out = {}
    for site in sites:
        key = next((k for k in rules if k != "default" and k not in ALL_ROLES and re.fullmatch(k, site.name)),
                   None)
        if key is None:
            key = site.role if site.role in rules else "default" if "default" in rules else None
        if key is None:
            raise ValueError(f"no rank rule for {site.name} (role {site.role}); add a 'default' key")
        out[site.param] = _site_rank(rules[key], site, d_model)
    return out


def _site_rank(rule: int | float, site: Site, d_model: int) -> tuple[int, str]:
    r = resolve_rank(rule, d_model)
    limit = min(site.d_in, site.d_out)
    if isinstance(rule, float) and r > limit:
        return limit, f"rank {r} ({rule:g} x d_model {d_model}) capped to min(d_in, d_out) = {limit}"
    return r, ""


def _layer_of(model: nn.Module, name: str) -> str:
    """The ancestor of ``name`` (or itself) that is an item of an ``nn.ModuleList`` (a layer of a stack);
    ``name`` when there is none."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList):
            return ".".join(parts[:i + 1])
    return name


def _child_of(parent: str, name: str) -> str:
    """The child of ``parent`` on the path to ``name`` ("model.layers", "model.layers.3.x.y" -> "model.layers.3")."""
    return parent + "." + name[len(parent) + 1:].split(".", 1)[0]


def _names(planned: list[PlannedSite], most: int = 6) -> str:
    names = [p.name for p in planned]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _blocks_of(sites: list[Site], model: nn.Module):
    """A function from a module name to the decoder block holding it ("" if none), with blocks found
    from the module paths of the sites that have attention/MLP roles."""
    chains = [[".".join(parts[:i]) for i in range(1, len(parts))]
              for parts in (s.name.split(".") for s in sites if s.role in BLOCK_ROLES)]
    blocks = [_layer_of(model, b) for b in find_blocks(chains, lambda name: type(model.get_submodule(name)))]
    stacks = {b.rpartition(".")[0] for b in blocks if "." in b}
    stacks = {s for s in stacks if len(blocks) >= 2 or isinstance(model.get_submodule(s), nn.ModuleList)}
    if stacks:  # a stack: its other layers (e.g. a hybrid's Mamba-only layers) are blocks too
        blocks += [_child_of(stack, s.name) for s in sites for stack in stacks if s.name.startswith(stack + ".")]
    prefixes = [b + "." for b in dict.fromkeys(blocks)]

    def block_of(name: str) -> str:
        return next((p[:-1] for p in prefixes if name.startswith(p)), "")
    return block_of


def _check_site(model: nn.Module, site: Site, rank: int) -> None:
    limit = min(site.d_in, site.d_out)
    if rank > limit:
        raise ValueError(f"rank {rank} for {site.name} ({site.role}, {site.d_in}->{site.d_out}) exceeds "
                         f"min(d_in, d_out) = {limit}")
    try:
        module = model.get_submodule(site.name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear) or module.weight is not model.get_parameter(site.param):
        raise ValueError(f"projection on parameter {site.param} is not an nn.Linear module; colaify can only "
                         "replace nn.Linear (exclude it, or wrap the matmul in nn.Linear)")


def _d_model(sites: list[Site]) -> int:
    attn_inputs = [s.d_in for s in sites if s.role in ATTN_INPUT_ROLES]
    pool = attn_inputs or [s.d_in for s in sites]
    return collections.Counter(pool).most_common(1)[0][0]
