"""Data parallelism: one process per device, started by ``torchrun``; DDP or FSDP2.

DDP keeps a full copy of the model on every rank and all-reduces (averages) gradients in backward.
FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter and, through the optimizer,
every optimizer state along dim 0 across ranks: each transformer block is its own unit, gathered
just before its forward/backward and freed after, so a rank holds about 1/N of the model between
uses. The loop is the same for both; gradients average over ranks either way, so N ranks with a
per-rank batch of B/N follow the same loss curve as one process with batch B.

The backend is gloo on the CPU and NCCL on GPUs. The process group comes from the environment that
``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or from a caller that
initialized it already.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmzoo.errors import ConfigError


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    parallel: str  # "none" | "ddp" | "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.parallel != "none"


def resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def setup(parallel: str, device: str = "auto") -> DistEnv:
    """Join (or find) the process group ``torchrun`` describes and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if parallel == "none":
        if world > 1:
            raise ConfigError(f"started as {world} processes (WORLD_SIZE={world}) but parallel is 'none': every "
                              "process would train its own copy; pass --parallel ddp or --parallel fsdp")
        return DistEnv(0, 1, 0, resolve_device(device, 0), "none")
    dev = resolve_device(device, local_rank)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ConfigError(f"--parallel {parallel} needs a process group: start the command with "
                              "`torchrun --nproc_per_node N -m lmzoo pretrain ...`")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, parallel)


def teardown(finished: bool) -> None:
    """Leave the process group, if this process joined one. Left to interpreter exit, gloo's worker
    threads are destroyed still joinable and a rank can abort after its work is done ("terminate called
    without an active exception"). After a finished command the ranks meet first, so none tears down
    while another still talks to it; after a failure they do not (the others may never arrive)."""
    if not dist.is_available() or not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the items of every ``nn.ModuleList`` whose items have an ``attn``.

    Family-agnostic on purpose: decoder layers, encoder layers and T5's cross-attention decoder
    layers qualify; MoE expert lists (no ``attn``) do not.
    """
    blocks = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(hasattr(b, "attn") for b in m):
            blocks.extend(m)
    return blocks


def wrap(model: nn.Module, env: DistEnv, find_unused_parameters: bool = False) -> nn.Module:
    if env.parallel == "none":
        return model
    if env.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    from torch.distributed.fsdp import fully_shard

    # fully_shard keeps each rank's own slice of its local tensors: make them rank 0's first.
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    for block in find_blocks(model):
        fully_shard(block)
    fully_shard(model)  # the rest: embeddings, final norm, head (a tied head stays one parameter)
    return model


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no storage) and whose buffers are real.

    FSDP2 shards the model in place, so a plain module to save or hand on after training has to be
    kept aside before ``wrap``; the buffers stay real because the non-persistent ones (RoPE tables,
    masks) are in no state dict to reload them from. Tied parameters stay tied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def materialize(shell: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A ``skeleton`` copy, on the CPU, with every parameter allocated (one tensor per tied group) and
    ``state`` (a full state dict) loaded into it, strictly."""
    plain = copy.deepcopy(shell)
    made: dict[int, nn.Parameter] = {}
    for m in plain.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                m._parameters[name] = made[id(p)]
    plain.to("cpu").load_state_dict(state)
    return plain


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose state_dict has the model's own key names (DDP adds ``module.``)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_numel(t: torch.Tensor) -> int:
    """Elements this rank stores: a DTensor's local shard, or the whole tensor."""
    return t.to_local().numel() if hasattr(t, "to_local") else t.numel()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. FSDP's global grad norm) as a plain tensor; others unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
