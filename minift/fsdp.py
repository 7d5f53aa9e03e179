"""FSDP2 for minift's models (``train.distributed = "fsdp"`` under torchrun): parameters, gradients
and AdamW's state sharded over the ranks, with ``torch.distributed.fsdp.fully_shard``.

    fully_shard(block) for every transformer block     (each block one all-gather / reduce-scatter unit)
    fully_shard(model)                                 (the root: embeddings, final norm, head, a score head)

Every parameter becomes a ``DTensor`` holding this rank's rows (dim-0 shard); the optimizer, built
after sharding, holds those shards, so AdamW's moments are sharded too. In a forward each block
all-gathers its parameters and frees them after (the root keeps its own until the backward); in the
backward it all-gathers them again and reduce-scatters its gradients, averaged over the ranks as
DDP's all-reduce averages them (the loop's denominator undoes the average the same way).

- Mixed precision (``MixedPrecisionPolicy``, from ``train.precision``): "bf16" all-gathers and
  computes in bfloat16 and reduces gradients in float32; "fp32" changes nothing. The sharded
  parameters and AdamW's state keep the model's storage dtype (``model.dtype``).
- Gradient accumulation (``train.fsdp_accumulation``): "sharded" reduce-scatters after every
  micro-batch, so no rank ever holds a whole gradient; "unsharded" skips the reduce-scatter and
  keeps the gathered parameters until the step's last micro-batch
  (``set_requires_gradient_sync`` / ``set_reshard_after_backward``): one all-gather and one
  reduce-scatter per step instead of per micro-batch, for whole parameters and gradients on each
  rank meanwhile.
- Clipping: ``clip_grad_norm_`` computes the global norm over the sharded gradients (a DTensor,
  made whole by ``optim.guarded_step``).
- Evaluation runs inside ``whole_parameters``: the parameters gathered once, kept through every
  forward, freed after (evaluation code calls the model outside its root forward, and ranks score
  different numbers of batches).
- Checkpoints (``save_state`` / ``load_state``): the sharded model and optimizer state through
  ``torch.distributed.checkpoint`` (one file per rank plus ``.metadata``, in the checkpoint folder;
  ``checkpoint.py`` makes the folder atomic). The final model is gathered tensor by tensor onto
  rank 0 (``gather_state_dict``) and written in transformers' layout there.

torchtitan and torchtune shard the same way (per block, then the root).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import InputError

MODEL_KEY, OPTIMIZER_KEY = "model", "optimizer"


def mixed_precision_policy(precision: str):
    """The ``MixedPrecisionPolicy`` of ``train.precision``: bf16 parameters for compute, gradients
    reduced in float32; fp32: none (the default policy casts nothing)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "fp32":
        return MixedPrecisionPolicy()
    raise InputError(f'train.distributed = "fsdp" with train.precision = {precision!r}: use "bf16" or "fp32"')


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks each sharded on their own: the entries of every ``nn.ModuleList`` (GPT's
    ``transformer.h``, the Llama decoder's ``model.layers``)."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]


@dataclass
class Sharding:
    """What ``fully_shard`` made of one model: its root and every sharded module (root first)."""

    root: nn.Module
    modules: list[nn.Module]
    accumulation: str = "sharded"

    @classmethod
    def apply(cls, model: nn.Module, device: torch.device, precision: str, accumulation: str) -> "Sharding":
        """Shard ``model`` in place: each transformer block, then the root."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        blocks = transformer_blocks(model)
        if not blocks:
            raise InputError(f'train.distributed = "fsdp": {type(model).__name__} has no transformer blocks '
                             f"(nn.ModuleList entries) to shard")
        policy = mixed_precision_policy(precision)
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        # FSDP decides which module is the root at the first forward; an evaluation before any
        # training step may call a block first, which would then take itself for the root
        model._get_fsdp_state()._lazy_init()
        return cls(model, [m for m in model.modules() if isinstance(m, FSDPModule)], accumulation)

    def before_micro_batch(self, last: bool) -> None:
        """Under "unsharded" accumulation: no gradient reduction and no resharding after the
        backward of every micro-batch but the last."""
        if self.accumulation == "unsharded":
            self.root.set_requires_gradient_sync(last)
            self.root.set_reshard_after_backward(last)

    @contextlib.contextmanager
    def whole_parameters(self) -> Iterator[None]:
        """Every module's parameters all-gathered once (collective: every rank enters together) and
        kept through any number of forward passes; resharded on the way out."""
        self.root.set_reshard_after_forward(False)
        for module in self.modules:
            module.unshard()
        try:
            yield
        finally:
            for module in self.modules:
                module.reshard()
            for module in self.modules:  # blocks free their parameters after each forward, the root does not
                module.set_reshard_after_forward(module is not self.root, recurse=False)

    def gather_state_dict(self, module: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
        """``module.state_dict()`` with each sharded tensor made whole (one at a time: collective),
        on the CPU, kept where ``keep`` (rank 0); an empty dict elsewhere."""
        from torch.distributed.tensor import DTensor

        out = {}
        for key, value in module.state_dict().items():
            whole = value.full_tensor() if isinstance(value, DTensor) else value
            if keep:
                out[key] = whole.detach().cpu()
            del whole
        return out


def _model_state(model: nn.Module, trained_only: bool) -> dict[str, torch.Tensor]:
    """The sharded state dict a checkpoint holds: every tensor, or only those that train (LoRA:
    the frozen base is read again from ``model.name``)."""
    state = model.state_dict()
    if not trained_only:
        return state
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {key: value for key, value in state.items() if key in trained}


def save_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trained_only: bool
               ) -> None:
    """Write this rank's shards of the model and optimizer into ``directory`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {MODEL_KEY: _model_state(model, trained_only),
             OPTIMIZER_KEY: get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(directory))


def load_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
               trained_only: bool) -> None:
    """Read what ``save_state`` wrote into the sharded ``model`` (and ``optimizer``), in place
    (collective). DCP reads into whatever sharding the tensors have now."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {MODEL_KEY: _model_state(model, trained_only)}
    if optimizer is not None:
        state[OPTIMIZER_KEY] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    model.load_state_dict(state[MODEL_KEY], strict=not trained_only)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state[OPTIMIZER_KEY])
