"""Batch samplers: which examples form each micro-batch, reproducibly, with a position that
can be saved and restored so a run resumes mid-epoch on exactly the next batch.

Every sampler computes an epoch's whole batch list from (seed, epoch) alone; its state is
``{"epoch", "consumed"}`` where ``consumed`` counts the batches of this epoch the training
loop has used (the loop increments it; a DataLoader may prefetch further ahead).

Under torchrun each rank takes ``rank::world_size`` of the global batches of an epoch.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from .errors import InputError


class BatchSampler:
    def __init__(self, n_examples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        if n_examples <= 0:
            raise InputError("cannot sample from an empty dataset")
        self.n_examples = n_examples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.consumed = 0
        self._cached: tuple[int, list[list[int]]] | None = None  # (epoch, this rank's batches)

    # subclasses: the order of all examples for an epoch, cut into global batches
    def global_batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``: the global batch list dealt round robin. Every rank
        must run the same number of steps, so the last ``len % world_size`` global batches
        (too few to give every rank one) are left out of this epoch; ``dropped_examples``
        counts them, the run reports it, and the next epoch's shuffle leaves out others.
        Built once per epoch (the loop asks for its length every step)."""
        if self._cached is None or self._cached[0] != epoch:
            batches = self.global_batches(epoch)
            usable = len(batches) - len(batches) % self.world_size
            self._cached = (epoch, batches[:usable][self.rank::self.world_size])
        return self._cached[1]

    def dropped_examples(self, epoch: int) -> int:
        batches = self.global_batches(epoch)
        return sum(len(b) for b in batches[len(batches) - len(batches) % self.world_size:])

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.consumed:]

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"kind": type(self).__name__, "epoch": self.epoch, "consumed": self.consumed,
                "seed": self.seed, "batch_size": self.batch_size, "n_examples": self.n_examples,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict, allow_changes: bool = False) -> None:
        """The saved position. ``allow_changes`` (``--resume-with-changes``): a sampler of another kind,
        seed, batch size or data size continues the saved epoch after about as many examples as were
        used: its batches of that epoch are cut anew, so the continuation is exact only where the order
        of examples is the same (``random``, ``sequential``, same seed and data) and the examples used
        fill whole new batches; elsewhere some examples of that epoch repeat or are left out."""
        changed = []
        for key in ("kind", "seed", "batch_size", "n_examples", "world_size"):
            mine = type(self).__name__ if key == "kind" else getattr(self, key)
            if state.get(key, mine) != mine:
                if not allow_changes or key == "world_size":
                    raise InputError(f"sampler state has {key}={state.get(key)!r} but this run has {mine!r}: "
                                     "resume with the same data, batch size, seed and world size")
                changed.append(key)
        self.epoch = state["epoch"]
        self.consumed = state["consumed"]
        if changed:
            used = state["consumed"] * state.get("batch_size", self.batch_size)
            self.consumed = min(math.ceil(used / self.batch_size), len(self))

    @staticmethod
    def _cut(order: Sequence[int], batch_size: int) -> list[list[int]]:
        return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_examples, generator=generator).tolist()


class SequentialSampler(BatchSampler):
    """Examples in dataset order (what the Trainer trace uses)."""

    def global_batches(self, epoch: int) -> list[list[int]]:
        return self._cut(range(self.n_examples), self.batch_size)


class RandomSampler(BatchSampler):
    """A new seeded permutation every epoch."""

    def global_batches(self, epoch: int) -> list[list[int]]:
        return self._cut(self._permutation(epoch), self.batch_size)


class LengthGroupedSampler(BatchSampler):
    """Trainer's ``group_by_length`` idea: shuffle, split into megabatches of
    ``megabatch_factor`` batches, sort each megabatch by length (longest first), cut into
    batches, then shuffle the batches so the order stays random (the batch holding the
    longest example goes first, so an out-of-memory shows at once)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, megabatch_factor: int = 50,
                 rank: int = 0, world_size: int = 1):
        super().__init__(len(lengths), batch_size, seed, rank, world_size)
        self.lengths = list(lengths)
        self.megabatch_factor = megabatch_factor

    def global_batches(self, epoch: int) -> list[list[int]]:
        order = self._permutation(epoch)
        mega = self.batch_size * self.megabatch_factor
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches.extend(self._cut(chunk, self.batch_size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 7919)
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        longest = max(range(len(shuffled)), key=lambda b: max(self.lengths[i] for i in shuffled[b]))
        shuffled[0], shuffled[longest] = shuffled[longest], shuffled[0]
        return shuffled


# -- Trainer's order (train.compat = "trainer") ---------------------------------------------------------
# transformers 5.24 / accelerate 1.15, one process. Trainer wraps its RandomSampler in accelerate's
# SeedableRandomSampler (data_loader.py:73-103): each epoch is randperm(n) from a generator seeded
# ``seed + epoch``. Its group_by_length sampler (trainer.py:1100, trainer_pt_utils.py:484-516) has no
# generator of its own: every epoch the DataLoader first draws its worker base seed (one int64) from
# torch's global RNG, then randperm(n) draws from that same RNG, right after Trainer's set_seed(seed).


def trainer_length_grouped_indices(lengths: Sequence[int], batch_size: int, generator: torch.Generator
                                   ) -> list[int]:
    """transformers' ``get_length_grouped_indices`` step for step: permute, cut into megabatches
    of ``min(n // (4 * batch_size), 50) * batch_size`` (at least one batch), sort each by length
    (longest first, a stable sort), then swap the longest example of all into position 0."""
    multiplier = min(len(lengths) // (batch_size * 4), 50) or 1
    indices = torch.randperm(len(lengths), generator=generator)
    size = multiplier * batch_size
    megabatches = [sorted(indices[i:i + size].tolist(), key=lambda i: lengths[i], reverse=True)
                   for i in range(0, len(lengths), size)]
    longest = int(torch.argmax(torch.tensor([lengths[m[0]] for m in megabatches])))  # first of the maxima
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [i for megabatch in megabatches for i in megabatch]


def _draw_loader_base_seed(generator: torch.Generator) -> None:
    """What torch's DataLoader iterator takes from the RNG before the sampler runs."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)


class TrainerRandomSampler(BatchSampler):
    """Trainer's random order: epoch ``e`` is ``randperm(n)`` seeded ``seed + e``."""

    def global_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return self._cut(torch.randperm(self.n_examples, generator=generator).tolist(), self.batch_size)


class TrainerLengthGroupedSampler(BatchSampler):
    """Trainer's ``group_by_length``: megabatches are built for a whole optimizer step
    (``batch_size * grad_accum`` sequences, as Trainer passes it), then cut into micro-batches.
    The random stream is Trainer's global one replayed: ``manual_seed(seed)``, then per epoch
    the DataLoader's base-seed draw and the permutation. Epochs after the first match Trainer
    only while nothing else drew from its global RNG (dropout 0, no evaluation mid-epoch)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, grad_accum: int = 1, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        super().__init__(len(lengths), batch_size, seed, rank, world_size)
        self.lengths = list(lengths)
        self.grad_accum = grad_accum

    def global_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch):  # replay the earlier epochs' draws
            _draw_loader_base_seed(generator)
            torch.randperm(self.n_examples, generator=generator)
        _draw_loader_base_seed(generator)
        order = trainer_length_grouped_indices(self.lengths, self.batch_size * self.grad_accum, generator)
        return self._cut(order, self.batch_size)


def trainer_eval_batches(lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool
                         ) -> list[list[int]]:
    """The eval batches Trainer forms (trainer.py:1148-1177): dataset order, or under group_by_length
    a LengthGroupedSampler with its own generator seeded ``seed``, the same at every evaluation."""
    order: Sequence[int] = range(len(lengths))
    if group_by_length:
        order = trainer_length_grouped_indices(lengths, batch_size, torch.Generator().manual_seed(seed))
    return BatchSampler._cut(order, batch_size)


class PackedSampler(BatchSampler):
    """Static shapes: a new seeded permutation every epoch, cut into batches that fill
    ``batch_size`` rows of ``row_length`` tokens (first fit, ``collate.pack_rows``' rule): an
    example that fits none of the batch's rows and finds all ``batch_size`` rows open starts the
    next batch. With ``PackingCollator(rows_per_batch=batch_size)`` every batch has the same
    shape; the number of examples per batch varies."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, row_length: int = 128,
                 rank: int = 0, world_size: int = 1):
        super().__init__(len(lengths), batch_size, seed, rank, world_size)
        self.lengths = list(lengths)
        self.row_length = row_length
        if max(self.lengths) > row_length:
            raise InputError(f"an example of {max(self.lengths)} tokens "
                             f"does not fit a packed row of {row_length}")

    def global_batches(self, epoch: int) -> list[list[int]]:
        batches: list[list[int]] = [[]]
        used: list[int] = []  # tokens in each row of the current batch
        for i in self._permutation(epoch):
            n = self.lengths[i]
            row = next((r for r, u in enumerate(used) if u + n <= self.row_length), len(used))
            if row == self.batch_size:
                batches.append([])
                used, row = [], 0
            if row == len(used):
                used.append(0)
            used[row] += n
            batches[-1].append(i)
        return batches


SAMPLERS = {"sequential": SequentialSampler, "random": RandomSampler, "length_grouped": LengthGroupedSampler,
            "packed": PackedSampler}
TRAINER_SAMPLERS = {"sequential": SequentialSampler, "random": TrainerRandomSampler,
                    "length_grouped": TrainerLengthGroupedSampler}


def make_sampler(kind: str, lengths: Sequence[int], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, order: str = "minift", grad_accum: int = 1, row_length: int = 128
                 ) -> BatchSampler:
    """``order = "trainer"``: Trainer's samplers (train.compat = "trainer"; ``grad_accum`` sizes
    its length-grouped megabatches). ``row_length``: the packed sampler's row (data.max_length)."""
    if kind not in SAMPLERS:
        raise InputError(f"unknown sampler {kind!r}; choose from {sorted(SAMPLERS)}")
    if kind == "packed":
        return PackedSampler(lengths, batch_size, seed, row_length, rank=rank, world_size=world_size)
    if order == "trainer" and kind == "length_grouped":
        return TrainerLengthGroupedSampler(lengths, batch_size, grad_accum, seed, rank=rank,
                                           world_size=world_size)
    if kind == "length_grouped":
        return LengthGroupedSampler(lengths, batch_size, seed, rank=rank, world_size=world_size)
    samplers = TRAINER_SAMPLERS if order == "trainer" else SAMPLERS
    return samplers[kind](len(lengths), batch_size, seed, rank=rank, world_size=world_size)
