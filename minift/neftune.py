"""NEFTune (``train.neftune_noise_alpha``): uniform noise on the input embeddings while training,
as transformers' ``neftune_post_forward_hook`` adds it (integrations/neftune.py):

    token embeddings [B, L, d]  +  U(-alpha / sqrt(L * d), +alpha / sqrt(L * d))     training mode only

A forward hook on the model's token embedding (``CausalLM.token_embedding``), added before the
first step and removed after the last, so evaluation, label scoring and the exported model never
see it. L is the padded length of the micro-batch, d the embedding width. The noise comes from
torch's global RNG, as dropout's masks do (its state is in every checkpoint: exact resume).

Under ``train.compat = "trainer"`` it comes from ``TrainerRNG`` instead, a generator of its own that
replays Trainer's global RNG stream, so the same seed gives Trainer's noise: seeded ``train.seed``
(Trainer's ``set_seed``), then, in Trainer's order, the draw torch's DataLoader makes when each
epoch's iterator starts (and, under group_by_length, that sampler's permutation), the noise of every
training micro-batch, and one draw per evaluation during training (the eval DataLoader's iterator).
Dropout masks draw from Trainer's global RNG too, so the noise matches with dropout 0.
"""
from __future__ import annotations

import torch

from .config import RunConfig, RunConfigError
from .sampling import TrainerLengthGroupedSampler

TRAINER_RNG_STATE = "trainer_rng"  # checkpoint entries (orchestration: the stage's extra_state)
TRAINER_RNG_EPOCH_PENDING = "trainer_rng_epoch_pending"


class TrainerRNG:
    """Trainer's global torch RNG, replayed: ``state`` holds the generator's state and
    ``epoch_pending`` whether the next training forward starts an epoch; both are tensors that a
    checkpoint saves and a resume restores in place (``checkpoint_entries``). ``permuted``: the
    examples group_by_length's sampler permutes at each epoch's start (0 = none). On CUDA the noise
    comes from the CUDA generator, which the DataLoaders' draws (CPU) leave alone."""

    def __init__(self, seed: int, device: torch.device, permuted: int = 0):
        self.device, self.permuted = device, permuted
        self.state = torch.Generator(device=device).manual_seed(seed).get_state()
        self.epoch_pending = torch.ones(1, dtype=torch.uint8)

    def checkpoint_entries(self) -> dict[str, torch.Tensor]:
        return {TRAINER_RNG_STATE: self.state, TRAINER_RNG_EPOCH_PENDING: self.epoch_pending}

    def _generator(self) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.set_state(self.state)
        return generator

    def _loader_draw(self, generator: torch.Generator) -> None:
        """What a DataLoader iterator takes from the global RNG when it starts (its base seed)."""
        if self.device.type == "cpu":
            torch.empty((), dtype=torch.int64).random_(generator=generator)

    def evaluation(self) -> None:
        """An evaluation during training: its DataLoader's draw."""
        generator = self._generator()
        self._loader_draw(generator)
        self.state.copy_(generator.get_state())

    def epoch_ended(self, state=None) -> None:
        """The next training forward starts an epoch (``Hooks.on_epoch_end``)."""
        self.epoch_pending.fill_(1)

    def uniform_(self, tensor: torch.Tensor, low: float, high: float) -> torch.Tensor:
        """Fill ``tensor`` with U(low, high); the epoch's starting draws first when one is pending."""
        generator = self._generator()
        if self.epoch_pending.item():
            self._loader_draw(generator)
            if self.permuted and self.device.type == "cpu":
                torch.randperm(self.permuted, generator=generator)
            self.epoch_pending.fill_(0)
        tensor.uniform_(low, high, generator=generator)
        self.state.copy_(generator.get_state())
        return tensor


class NEFTune:
    """The noise hook. ``rng``: a ``TrainerRNG``, or None for torch's global RNG."""

    def __init__(self, alpha: float, rng: TrainerRNG | None = None):
        self.alpha, self.rng = alpha, rng

    def __call__(self, module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        dims = torch.tensor(output.size(1) * output.size(2))
        magnitude = float(self.alpha / torch.sqrt(dims))  # float32, as transformers computes it
        noise = torch.zeros_like(output)
        if self.rng is None:
            noise.uniform_(-magnitude, magnitude)
        else:
            self.rng.uniform_(noise, -magnitude, magnitude)
        return output + noise

    def attach(self, model) -> torch.utils.hooks.RemovableHandle:
        """Hook the token embedding of ``model`` (a ``CausalLM``); ``.remove()`` the handle after training."""
        return model.token_embedding.register_forward_hook(self)


def build_neftune(cfg: RunConfig, model, sampler, device: torch.device) -> NEFTune | None:
    """The noise hook ``[train]`` asks for (None when ``neftune_noise_alpha`` is 0): from torch's
    global RNG, or under ``compat = "trainer"`` from Trainer's stream replayed (``TrainerRNG``)."""
    t = cfg.train
    if not t.neftune_noise_alpha:
        return None
    if not hasattr(model, "token_embedding"):
        raise RunConfigError(f"train.neftune_noise_alpha: {type(model).__name__} has no token embedding to "
                             f"add noise to; set it to 0 for this stage")
    rng = None
    if t.compat == "trainer":
        permuted = sampler.n_examples if isinstance(sampler, TrainerLengthGroupedSampler) else 0
        rng = TrainerRNG(t.seed, device, permuted)
    return NEFTune(t.neftune_noise_alpha, rng)
