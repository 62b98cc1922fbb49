"""Data-parallel helpers for ``torchrun``: process group, DDP / FSDP2 wrapping, the full model.

Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything is a no-op for one process.
CPU runs use the gloo backend, CUDA runs NCCL.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device | None = None) -> DistEnv:
    """Join the ``torchrun`` process group if launched by it (once); return this process's place.

    The backend is NCCL when ``device`` is CUDA (or, without ``device``, when CUDA is present), else
    gloo; on CUDA each process uses ``cuda:LOCAL_RANK``.

    Raises:
        RuntimeError: torch.distributed is not available in this build but WORLD_SIZE > 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistEnv()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if on_cuda:
            torch.cuda.set_device(device if device is not None and device.index is not None else local_rank)
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank)


def world_size() -> int:
    """Number of processes (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes (returned as a new tensor; identity for one process)."""
    if world_size() == 1:
        return t
    if dist.get_backend() == "nccl" and t.device.type != "cuda":  # NCCL reduces CUDA tensors only
        out = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(out)
        return out.to(t.device)
    t = t.clone()
    dist.all_reduce(t)
    return t


def barrier() -> None:
    """Wait for every process (no-op for one process)."""
    if world_size() > 1:
        dist.barrier()


def wrap(model: nn.Module, env: DistEnv, fsdp: bool, device: torch.device | None = None,
         param_dtype: torch.dtype | None = None) -> tuple[nn.Module, nn.Module]:
    """Move ``model`` to ``device`` and wrap it for data parallelism: DDP, or FSDP2 ``fully_shard``
    per decoder layer and root. ``param_dtype`` (FSDP only) is the compute dtype of a
    ``MixedPrecisionPolicy`` (parameters stay in their own dtype, gradients reduce in fp32).

    Returns:
        ``(model to train, plain module to save)``; for FSDP the plain module is an unsharded copy
        on rank 0's CPU (None elsewhere) that :func:`full_model` refreshes for the final save
        (checkpoints under FSDP are sharded, see :func:`colafx.runtime.checkpoint.save_sharded_checkpoint`).
    """
    device = device or torch.device("cpu")
    if env.world == 1:
        model = model.to(device)
        return model, model
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        model = model.to(device)
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids), model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plain = copy.deepcopy(model).cpu() if env.is_main else None
    model = model.to(device)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": policy} if policy else {}
    layers = getattr(getattr(model, "model", model), "layers", [])
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model, plain


def full_model(model: nn.Module, plain: nn.Module, env: DistEnv, fsdp: bool) -> nn.Module:
    """The unwrapped model with the current weights (rank 0 under FSDP; collective there)."""
    if fsdp and env.world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.is_main:
            plain.load_state_dict(weights)
        return plain if env.is_main else model
    return plain


def load_optimizer_state(model: nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    """Restore a full (unsharded) optimizer state dict, e.g. from a one-process checkpoint (under
    FSDP each rank keeps its shard of it)."""
    if fsdp and world_size() > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
