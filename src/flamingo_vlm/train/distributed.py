"""torch.distributed plumbing: process groups (gloo on CPU, NCCL on GPUs), DDP and FSDP2 wrapping.

Launch with ``torchrun --nproc_per_node N``; the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables
it sets are read here. One process is "rank 0 of 1" and needs no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.backend is not None


def setup(mode: str, device: str | None = None) -> DistInfo:
    """Initialise the process group for ``mode`` ("none", "ddp", "fsdp") from torchrun's variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if mode == "none":
        if world > 1:
            from .config import ConfigError

            raise ConfigError(
                f"launched on {world} processes but distributed is 'none'; set distributed: ddp or fsdp "
                "(or run a single process)"
            )
        dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return DistInfo(device=dev)
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = "nccl" if use_cuda else "gloo"
    initialized_here = False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            # A single process asked for ddp/fsdp without torchrun: a group of one.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend=backend, rank=rank, world_size=world, device_id=dev if use_cuda else None)
        initialized_here = True
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=dev,
        backend=dist.get_backend(), initialized_here=initialized_here,
    )


def teardown(info: DistInfo, model: nn.Module | None = None) -> None:
    """End the process group (when :func:`setup` made it); ``model``: the wrapped model, whose DDP
    reducer is freed first (:func:`release`)."""
    if model is not None:
        release(model)
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def release(model: nn.Module) -> None:
    """Free a DDP wrapper's C++ reducer and logger now, while the process group is still registered.

    They own the process group, and their Python bindings free it without releasing the GIL: had
    they been the last owners (after ``destroy_process_group``, when the trainer is dropped), gloo's
    destructor would join its worker threads holding the GIL while a worker waits for the GIL to
    free the tensors of its last all-reduce: a deadlock at the end of a run that has finished and
    saved everything (pytorch/pytorch#56297). The process group's own binding releases the GIL.
    The wrapper cannot run after this.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP):
        for name in ("logger", "reducer"):  # the logger holds the reducer
            if getattr(model, name, None) is not None:
                setattr(model, name, None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- collectives that are no-ops on one process ---------------------------------------------------
def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled and info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj, info: DistInfo) -> list:
    if not (info.enabled and info.world_size > 1):
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    if not (info.enabled and info.world_size > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled and info.world_size > 1:
        dist.barrier()


# -- wrapping ---------------------------------------------------------------------------------------
def wrap(model: nn.Module, mode: str, info: DistInfo) -> nn.Module:
    """``model`` for training under ``mode`` (``none``, ``ddp``, ``fsdp``): :func:`wrap_ddp`,
    :func:`wrap_fsdp` or the model itself."""
    return wrap_ddp(model, info) if mode == "ddp" else wrap_fsdp(model, info) if mode == "fsdp" else model


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP over the trainable parameters only: the frozen LM and vision tower get no gradient
    buckets and compute no weight gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import inspect

    kwargs = {}
    # No running statistics to sync each forward (index buffers are identical by construction).
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    return DDP(
        model,
        device_ids=[info.device.index] if info.device.type == "cuda" else None,
        find_unused_parameters=False,
        gradient_as_bucket_view=True,
        **kwargs,
    )


def wrap_fsdp(model: nn.Module, info: DistInfo, *, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 (``fully_shard``): one unit per decoder layer, one per cross-attention block, the
    perceiver, then the root (vision tower, embeddings, head).

    Frozen and trainable weights sit in separate units, so units of the frozen LM only all-gather
    weights; autograd computes no weight gradients for them and nothing is reduce-scattered.

    The cross-attention unit is the :class:`FlamingoLayer` itself (whose only direct parameters
    are its block's): the block's image keys/values are computed by the layer *before* the block's
    own forward, so a unit on the block alone would not have gathered ``to_kv`` in time.
    """
    from torch.distributed.fsdp import fully_shard

    kwargs = {"reshard_after_forward": reshard_after_forward}
    if info.device.type == "cuda":
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["mesh"] = init_device_mesh("cuda", (info.world_size,))
    else:
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["mesh"] = init_device_mesh("cpu", (info.world_size,))
    fully_shard(model.perceiver, **kwargs)
    for layer in model.decoder_layers():
        fully_shard(layer.decoder_layer, **kwargs)
        if layer.gated_cross_attn_layer is not None:
            fully_shard(layer, **kwargs)
    # The root (vision tower, embeddings, head) stays gathered from forward to backward: backward
    # needs it at once, and the chunked loss calls the head after the model's forward.
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The Flamingo inside a DDP wrapper (FSDP2 modifies the module in place)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "decoder_layers") else model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A full (unsharded) copy of a parameter / state tensor; collective under FSDP2."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.full_tensor()
    return t


def like_param(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Shard a full tensor the way ``param`` is sharded (a DTensor under FSDP2), on its device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(full.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements)
    return full.to(device=param.device, dtype=param.dtype)
