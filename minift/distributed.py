"""Scale-out on torchrun, as one object: ``Distributed`` knows the rank, the world size and the
device, and does the few collective operations that keep N ranks exactly equal to one process
(sum a tensor, gather objects, skip DDP's all-reduce on all but the last micro-batch).

In one process (``WORLD_SIZE`` unset or 1) every method is the identity, so the single-process
path runs no distributed code. It hands the loop ``reduce_sum`` / ``no_sync`` and the recipe
``wrap``, ``gather`` (sampler/RNG state for checkpoints) and the evaluation shard.

``wrap`` has two modes (``train.distributed``):

    "ddp"   DistributedDataParallel: every rank holds the whole model, gradients all-reduced once
            per optimizer step (``no_sync`` on the other micro-batches)
    "fsdp"  FSDP2 (``torch.distributed.fsdp.fully_shard``): each transformer block, then the root,
            shards its parameters over the ranks (``fsdp.py``); gradients and AdamW's state are
            sharded with them. A block's parameters are all-gathered for its forward and again for
            its backward, its gradients reduce-scattered; evaluation and the final export see the
            whole parameters (``whole_model``, ``gather_state_dict``)
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist

from .errors import ResumeRefused


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: Any = field(default=None, repr=False)  # fsdp.Sharding once ``wrap`` sharded the model

    @classmethod
    def from_env(cls) -> "Distributed":
        """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
        NCCL on CUDA, gloo on CPU. One process when WORLD_SIZE is unset or 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend=backend)
        return cls(rank, world_size, local_rank, device)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- what the loop uses --------------------------------------------------------------------
    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over ranks (a new tensor; the input itself in one process)."""
        if not self.enabled:
            return tensor
        tensor = tensor.clone()
        torch_dist.all_reduce(tensor)
        return tensor

    def sum_count(self, count: int, device: torch.device):
        """A step's count (a Python int from the collators) summed over ranks: the int itself in one
        process (no device work); a float64 tensor on ``device`` under DDP."""
        if not self.enabled:
            return count
        return self.reduce_sum(torch.tensor(count, device=device, dtype=torch.float64))

    def no_sync(self, model, last_micro_batch: bool):
        """DDP's ``no_sync`` on every micro-batch but the last: gradients are all-reduced once per step.
        FSDP: ``fsdp_accumulation = "unsharded"`` likewise skips the reduce-scatter (and keeps the
        parameters gathered) until the last micro-batch; "sharded" reduces after each one."""
        if self.fsdp is not None:
            self.fsdp.before_micro_batch(last_micro_batch)
            return contextlib.nullcontext()
        if last_micro_batch or not hasattr(model, "no_sync"):
            return contextlib.nullcontext()
        return model.no_sync()

    # -- what the recipe uses ------------------------------------------------------------------
    def wrap(self, model, mode: str = "ddp", precision: str = "fp32", accumulation: str = "sharded"):
        """``DistributedDataParallel`` around ``model`` (mode "ddp"), or ``model`` itself sharded in
        place by FSDP2 (mode "fsdp", mixed precision from the run's ``precision``, see ``fsdp.py``);
        the model itself in one process."""
        if not self.enabled:
            return model
        if mode == "fsdp":
            from .fsdp import Sharding

            self.fsdp = Sharding.apply(model, self.device, precision, accumulation)
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    @property
    def sharded(self) -> bool:
        """Whether ``wrap`` sharded the model (FSDP): checkpoints then go through DCP."""
        return self.fsdp is not None

    def whole_model(self):
        """A context in which every rank holds the whole parameters of the sharded model (FSDP), for
        evaluation and generation: forward passes then run without collectives, so ranks may run
        different numbers of them. The identity without FSDP."""
        return self.fsdp.whole_parameters() if self.fsdp is not None else contextlib.nullcontext()

    def gather_state_dict(self, module) -> dict:
        """``module.state_dict()`` with whole tensors: FSDP's shards gathered one tensor at a time,
        kept (on the CPU) by rank 0 only — every rank must call it. Without FSDP the state dict."""
        if self.fsdp is None:
            return module.state_dict()
        return self.fsdp.gather_state_dict(module, self.is_main)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return self.gather(obj)[0]

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (a one-element list in one process)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def shard(self, items: list) -> list:
        """This rank's share of ``items``, dealt round robin."""
        return items[self.rank::self.world_size] if self.enabled else items

    def check_world_size(self, saved_world_size: int) -> None:
        """Refuse a checkpoint of another number of ranks: each rank's sampler position and RNG state
        are its own (FSDP's sharded weights and optimizer state would reshard: DCP loads them into any
        sharding, but the data order would not continue)."""
        if saved_world_size != self.world_size:
            raise ResumeRefused(f"checkpoint was written with world size {saved_world_size}, this run has "
                               f"{self.world_size}: resume with --nproc-per-node {saved_world_size} "
                               f"(each rank's sampler position and RNG state are per rank)")

    def shutdown(self) -> None:
        """Leave the process group; wait for the other ranks first unless an error is unwinding
        (a failed rank must not block in a barrier the others never reach)."""
        if self.enabled and torch_dist.is_initialized():
            if sys.exc_info()[0] is None:
                torch_dist.barrier()
            torch_dist.destroy_process_group()


SINGLE_PROCESS = Distributed()
