"""Scale-out on torchrun: process group from the environment, DDP, rank-aware sampling,
and the reductions that keep N ranks exactly equal to one process.

With ``WORLD_SIZE`` unset or 1 every function here is the identity, so the single-process
path has no distributed code in it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from .evaluate import EvalResult, finish_eval
from .sampling import make_sampler


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
    NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend)
    return DistInfo(rank, world_size, local_rank, device)


def shutdown(dist: DistInfo) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def make_rank_sampler(kind: str, lengths, batch_size: int, seed: int, dist: DistInfo):
    return make_sampler(kind, lengths, batch_size, seed, rank=dist.rank, world_size=dist.world_size)


def wrap_model(model, dist: DistInfo):
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def sum_reducer(dist: DistInfo):
    """Sum of a tensor over ranks (the loss-target count and the summed loss of a step)."""
    if not dist.enabled:
        return lambda t: t

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        torch_dist.all_reduce(t)
        return t

    return reduce


def gather_objects(obj, dist: DistInfo) -> list:
    """Every rank's ``obj``, in rank order (a one-element list in one process)."""
    if not dist.enabled:
        return [obj]
    out = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def check_world_size(saved: dict, dist: DistInfo) -> None:
    saved_world = saved.get("world_size", 1)
    if saved_world != dist.world_size:
        raise RuntimeError(f"checkpoint was written with world size {saved_world}, this run has "
                           f"{dist.world_size}: resume with --nproc-per-node {saved_world} (each rank's sampler "
                           f"position and RNG state are per rank)")


def shard_eval(eval_data, dist: DistInfo):
    """This rank's share of the evaluation data (batches and prompts dealt round robin)."""
    if not dist.enabled:
        return eval_data
    return type(eval_data)(batches=eval_data.batches[dist.rank::dist.world_size],
                           prompts=eval_data.prompts[dist.rank::dist.world_size],
                           gold=eval_data.gold[dist.rank::dist.world_size], label_ids=eval_data.label_ids)


def reduce_eval(result: EvalResult, dist: DistInfo, n_classes: int) -> EvalResult:
    """Token-weighted loss and accuracy over all ranks' shards."""
    if not dist.enabled:
        return result
    parts = gather_objects((result.loss_sum, result.n_loss_targets, result.predicted, result.gold), dist)
    loss_sum = sum(p[0] for p in parts)
    count = sum(p[1] for p in parts)
    if result.predicted is None:
        return finish_eval(loss_sum, count, None, None, 0)
    predicted = [x for p in parts for x in p[2]]
    gold = [x for p in parts for x in p[3]]
    return finish_eval(loss_sum, count, predicted, gold, n_classes)


def device_sync(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None
