"""The numbers of docs/grpo.md: one GRPO round that TRL 1.16 sampled (tests/data/trl_rl_trace.json, setting
``grpo_dapo_beta_mu2``), replayed by minift stage by stage, the two optimizer steps written out by hand,
beside the numbers TRL logged for them.

    PYTHONPATH=. python3 docs/grpo_numbers.py     # prints the markdown that docs/grpo.md shows

Needs the shared fixtures (``tiny-gpt2``); tests/test_rl.py checks that the doc shows this output.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import torch

from minift.hub import from_pretrained
from minift.rl import advantages as adv
from minift.rl.batching import round_batch, shuffled_split, tokens_per_micro_batch
from minift.rl.objective import CompletionLogProbs, GRPOObjective, completion_logps

REPO = Path(__file__).resolve().parents[1]
SETTING = "grpo_dapo_beta_mu2"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def f(x: float, digits: int = 4) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def main() -> None:
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]
    import trl_rl  # the setting, the reward functions, the fixture's path

    trace = json.loads(trl_rl.TRACE.read_text())["settings"][SETTING]
    cfg, logged = trace["config"], trace["steps"]
    records = [r for r in trace["completions"] if r["step"] == 1]
    tokenizer = trl_rl.minift_tokenizer()
    G, weights = cfg["num_generations"], torch.tensor(cfg["reward_weights"])
    stop_ids = set(trl_rl.eos_ids())

    # 1. the round: what was sampled, and its rewards
    prompts = [r["prompt"] for r in records]
    completion_ids = [r["completion_ids"] for r in records]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]
    columns = [trl_rl.REWARDS[name](prompts=prompts, completions=texts, completion_ids=completion_ids)
               for name in cfg["rewards"]]
    per_func = torch.tensor([[float("nan") if c[i] is None else c[i] for c in columns]
                             for i in range(len(texts))])
    rewards = adv.weighted_rewards(per_func, weights)
    advantages, std = adv.grpo_advantages(rewards, G, cfg["scale_rewards"])
    groups = rewards.view(-1, G)
    print("**1. The round: sampled completions, rewards, advantages** (2 prompts × 4 completions)\n")
    rows = []
    for i, ids in enumerate(completion_ids):
        end = "EOS" if ids[-1] in stop_ids else "cut"
        rows.append([i, f"`{prompts[i][:24]}…`", f"`{texts[i][:18]!r}`", len(ids), end,
                     f(per_func[i, 0].item()), f(per_func[i, 1].item()), f(rewards[i].item()),
                     f(torch.nanmean(groups[i // G]).item()), f(std[i].item()), f(advantages[i].item())])
    print(table(["row", "prompt", "completion", "tokens", "ends", "vowel_share", "short_length",
                 "reward (1·a + 0.5·b)", "group mean", "group std", "advantage"], rows))
    metrics = adv.reward_metrics(per_func, weights, list(cfg["rewards"]), std)
    print(f"\nreward {f(metrics['reward'])} (TRL {f(logged[0]['reward'])}), reward_std "
          f"{f(metrics['reward_std'])} (TRL {f(logged[0]['reward_std'])}); a None counts as 0 in the sum.\n")

    # 2. the layout, and the old / reference log-probs at the round's start
    lm = from_pretrained(trl_rl.FIXTURES / trl_rl.SETUP["checkpoint"], resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0)
    policy = CompletionLogProbs(lm).train()
    reference = CompletionLogProbs(copy.deepcopy(lm)).eval().requires_grad_(False)
    batch = round_batch([tokenizer.encode(p) for p in prompts], completion_ids, trl_rl.EOS, stop_ids)
    cpu = torch.device("cpu")
    n_tokens = int(batch["completion_mask"].sum())
    batch.update(advantages=advantages, old_logps=completion_logps(policy, batch, cfg["per_device"], cpu),
                 ref_logps=completion_logps(reference, batch, cfg["per_device"], cpu),
                 tokens_per_micro_batch=tokens_per_micro_batch(n_tokens, 1, cfg["steps_per_generation"]))
    permutation = [0] * len(records)
    for row, r in enumerate(records):
        permutation[r["position"]] = row
    parts = shuffled_split(batch, permutation, cfg["steps_per_generation"])
    width = batch["input_ids"].shape[1]
    prompt_width = width - batch["completion_mask"].shape[1]
    print(f"**2. Layout.** Prompts left-padded to {prompt_width} tokens, completions right-padded to "
          f"{width - prompt_width}: input_ids [8, {width}]. Completion tokens in the round: {n_tokens}, so "
          f"\"dapo\" divides each micro-batch's summed token loss by {n_tokens} / (1 rank × 2 "
          f"micro-batches) = {batch['tokens_per_micro_batch']}. TRL's shuffle: training row k = round row "
          f"{permutation}; micro-batch 0 = rows {permutation[:4]}, micro-batch 1 = rows {permutation[4:]}. "
          "Old and reference log-probs are computed now (4 rows per forward); num_iterations = 2 trains on "
          "the round twice.\n")

    # 3. the two optimizer steps on this round, by hand (what loop.train does)
    objective = GRPOObjective(loss_type=cfg["loss_type"], epsilon_low=cfg["epsilon"],
                              epsilon_high=cfg["epsilon_high"], beta=cfg["beta"])
    optimizer = torch.optim.SGD(policy.parameters(), lr=cfg["lr"])
    print("**3. Two optimizer steps on the round** (step 2 reuses it: its ratios are to the weights that "
          "sampled it)\n")
    rows = []
    for step in (1, 2):
        outs = []
        for k, part in enumerate(parts):
            with torch.no_grad():
                logps, _ = policy(part["input_ids"], part["attention_mask"], part["position_ids"],
                                  part["completion_mask"].shape[1])
            mask = part["completion_mask"].bool()
            ratio = torch.exp(logps - part["old_logps"])[mask]
            out = objective(policy, part, cpu)
            (out.loss_sum / len(parts)).backward()  # count 1 per micro-batch: the loop divides by 2
            outs.append(out)
            m = out.metric_sums
            rows.append([step, k, int(mask.sum()), f"{f(ratio.min().item(), 3)}..{f(ratio.max().item(), 3)}",
                         f(out.loss_sum.item()), f(m["kl"].item()), f(m["entropy"].item()),
                         f(m["clip_ratio/low_mean"].item()), f(m["clip_ratio/high_mean"].item())])
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), trl_rl.SETUP["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad()
        mean = {name: sum(o.metric_sums[name].item() for o in outs) / len(outs)
                for name in ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean")}
        t = logged[step - 1]
        rows.append([step, "**step**", "", f"grad_norm {f(grad_norm.item())} (TRL {f(t['grad_norm'])})",
                     f"{f(sum(o.loss_sum.item() for o in outs) / len(outs))} (TRL {f(t['loss'])})",
                     f"{f(mean['kl'])} (TRL {f(t['kl'])})", f"{f(mean['entropy'])} (TRL {f(t['entropy'])})",
                     f"{f(mean['clip_ratio/low_mean'])} (TRL {f(t['clip_ratio/low_mean'])})",
                     f"{f(mean['clip_ratio/high_mean'])} (TRL {f(t['clip_ratio/high_mean'])})"])
    header = ["step", "micro-batch", "tokens", "ratio π/π_old", "loss", "kl", "entropy", "clip low",
              "clip high"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
