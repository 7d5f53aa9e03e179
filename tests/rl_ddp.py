"""One optimizer step of each RL objective, in one process or on torchrun's ranks (tests/test_rl.py runs
both and compares): ``PYTHONPATH=. python3 tests/rl_ddp.py OUT.json`` or ``PYTHONPATH=. python3 -m
torch.distributed.run --nproc-per-node 2 tests/rl_ddp.py OUT.json``.

The round: 16 completions (4 prompts × 4), float64 tiny GPT. As TRL lays a round out over ranks, rank r
holds the contiguous rows [8r, 8r + 8) and cuts them into 2 micro-batches of 4; one process holds all
16 rows, its micro-batch k made of micro-batch k of every rank. Rank 0 writes the step's logged record
and the final weights of every objective.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from minift.distributed import Distributed
from minift.loop import Hooks, train
from minift.models import GPTConfig, build_model
from minift.rl.batching import RoundLoader, round_batch, shuffled_split, tokens_per_micro_batch
from minift.rl.objective import CompletionLogProbs, GRPOObjective, RLOOObjective, finish_step_metrics

ROWS, GROUP, STEPS_PER_GENERATION = 16, 4, 2
OBJECTIVES = {
    "dapo_beta": lambda dist: GRPOObjective(beta=0.1, epsilon_low=0.05, dist=dist),
    "grpo_sequence": lambda dist: GRPOObjective(loss_type="grpo", importance_sampling_level="sequence",
                                                epsilon_low=0.02, dist=dist),
    "dr_grpo": lambda dist: GRPOObjective(loss_type="dr_grpo", max_completion_length=5, epsilon_low=0.05,
                                          dist=dist),
    "rloo": lambda dist: RLOOObjective(epsilon_low=0.05, dist=dist),
}


def the_round(lm) -> dict:
    """The whole round, the same on every rank: ids, advantages, old and reference log-probs."""
    g = torch.Generator().manual_seed(0)

    def ids(lo, hi):
        return torch.randint(1, 38, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    prompts = [p for p in (ids(1, 6) for _ in range(ROWS // GROUP)) for _ in range(GROUP)]
    completions = [ids(1, 5) + ([39] if i % 3 else []) for i in range(ROWS)]
    batch = round_batch(prompts, completions, 0, {39, 0}, mask_truncated=True)
    mask = batch["completion_mask"].double()
    with torch.no_grad():
        logps = CompletionLogProbs(lm)(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                       mask.shape[1])[0]
    batch["old_logps"] = (logps + 0.1 * torch.randn(logps.shape, generator=g, dtype=torch.float64)) * mask
    batch["ref_logps"] = (logps + 0.3 * torch.randn(logps.shape, generator=g, dtype=torch.float64)) * mask
    batch["advantages"] = torch.randn(ROWS, generator=g, dtype=torch.float64)
    batch["round_tokens"] = int(mask.sum())
    return batch


def micro_batches(batch: dict, dist: Distributed) -> list[dict]:
    rows_per_rank = ROWS // dist.world_size
    rows = torch.arange(dist.rank * rows_per_rank, (dist.rank + 1) * rows_per_rank)
    if not dist.enabled:  # one process: micro-batch k holds micro-batch k of each of 2 ranks
        rows = torch.cat([torch.arange(0, 4), torch.arange(8, 12), torch.arange(4, 8), torch.arange(12, 16)])
    local = {k: v[rows] if torch.is_tensor(v) else v for k, v in batch.items()}
    local["tokens_per_micro_batch"] = tokens_per_micro_batch(batch["round_tokens"], dist.world_size,
                                                             STEPS_PER_GENERATION)
    return shuffled_split(local, list(range(len(rows))), STEPS_PER_GENERATION)


def main(out: Path) -> None:
    dist = Distributed.from_env()
    results = {}
    for name, make_objective in OBJECTIVES.items():
        torch.manual_seed(0)
        lm = build_model(GPTConfig(vocab_size=40, n_positions=24, n_embd=16, n_layer=2, n_head=2,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).double()
        parts = micro_batches(the_round(lm), dist)
        model = dist.wrap(CompletionLogProbs(lm))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        records: list[dict] = []
        train(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0),
              RoundLoader(lambda r, parts=parts: parts, 1), total_steps=1, grad_accum=STEPS_PER_GENERATION,
              max_grad_norm=1.0, loss=make_objective(dist), dist=dist, hooks=Hooks(log=records.append))
        results[name] = {"record": finish_step_metrics(records[0]),
                         "weights": {k: v.flatten().tolist() for k, v in lm.state_dict().items()}}
    if dist.is_main:
        out.write_text(json.dumps(results))
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
