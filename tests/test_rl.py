"""The RL update (minift.rl): advantages, the round's layout, the GRPO / RLOO objectives and the
completions file, against hand-written float64 formulas, a full-logits log-prob computation, the loop
run by hand, and TRL's GRPOTrainer / RLOOTrainer (live, or through their saved trace)."""
from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
import torch
from torch import nn
from trl_rl import DEFAULT_SUITE, SETTINGS, STEP_KEYS, TRACE, config, run_minift, run_trl, weight_digest

from minift.loop import Hooks, train
from minift.models import GPTConfig, build_model
from minift.rl import advantages as adv
from minift.rl.batching import (
    RoundLoader,
    left_pad,
    needs_old_logps,
    position_ids,
    round_batch,
    shuffled_split,
    tokens_per_micro_batch,
)
from minift.rl.objective import (
    COUNT_PREFIX,
    CompletionLogProbs,
    GRPOObjective,
    RLOOObjective,
    completion_logps,
    finish_step_metrics,
)
from minift.rl.replay import ReplayError, ReplayRound, ReplayWriter, read_replay, write_replay

from conftest import shared_path

NAN = float("nan")
CPU = torch.device("cpu")


def _nanlist(values):
    return [v for v in values if not math.isnan(v)]


# -- advantages -------------------------------------------------------------------------------------------
def test_nanstd_is_the_sample_std_of_the_values_present():
    values = torch.tensor([[1.0, NAN, 4.0, 6.5], [NAN, NAN, 2.0, NAN]], dtype=torch.float64)
    rows = adv.nanstd(values, dim=1)
    assert rows[0].item() == pytest.approx(statistics.stdev([1.0, 4.0, 6.5]), rel=1e-14)
    assert math.isnan(rows[1].item())  # one value: no sample std
    assert adv.nanstd(values).item() == pytest.approx(statistics.stdev([1.0, 4.0, 6.5, 2.0]), rel=1e-14)


def test_weighted_rewards_count_a_none_as_zero_unless_every_function_returned_none():
    per_func = torch.tensor([[1.0, 2.0], [NAN, 2.0], [NAN, NAN], [0.5, NAN]], dtype=torch.float64)
    got = adv.weighted_rewards(per_func, torch.tensor([1.0, 0.5]))
    assert got[[0, 1, 3]].tolist() == [2.0, 1.0, 0.5]
    assert math.isnan(got[2].item())


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_against_hand_formulas(scale):
    # 3 groups of 4; group 2 has std 0
    rewards = [0.1, 0.7, NAN, 0.4, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.5, NAN]
    got, std = adv.grpo_advantages(torch.tensor(rewards, dtype=torch.float64), 4, scale)
    present = _nanlist(rewards)
    for i, r in enumerate(rewards):
        group = _nanlist(rewards[i // 4 * 4:i // 4 * 4 + 4])
        want_std = statistics.stdev(present) if scale == "batch" else statistics.stdev(group)
        assert std[i].item() == pytest.approx(want_std, rel=1e-13, abs=1e-15)
        if math.isnan(r):
            assert got[i].item() == 0.0  # unscorable: no signal
            continue
        want = r - statistics.fmean(group)
        if scale != "none":
            want /= want_std + 1e-4
        assert got[i].item() == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_leave_one_out_against_hand_formulas(normalize):
    rewards = [1.0, 3.0, NAN, 0.0, 5.0, NAN, NAN, NAN, 2.0, 2.0, 4.0, 0.5]  # group 1: one scorable completion
    got, std = adv.rloo_advantages(torch.tensor(rewards, dtype=torch.float64), 4, normalize)
    raw = []
    for i, r in enumerate(rewards):
        group = rewards[i // 4 * 4:i // 4 * 4 + 4]
        others = _nanlist(group[:i % 4] + group[i % 4 + 1:])
        raw.append(NAN if math.isnan(r) or not others else r - statistics.fmean(others))
    present = _nanlist(raw)
    for i, value in enumerate(raw):
        if math.isnan(value):
            assert got[i].item() == 0.0
            continue
        want = value
        if normalize:
            want = (value - statistics.fmean(present)) / (statistics.stdev(present) + 1e-4)
        assert got[i].item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert std[0].item() == pytest.approx(statistics.stdev([1.0, 3.0, 0.0]), rel=1e-13)
    assert math.isnan(std[1].item())


def test_sequence_kl_sums_the_log_ratio_over_completion_tokens():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, -7.0], [-1.0, -0.25, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert adv.sequence_kl(old, ref, mask).tolist() == [0.5 - 1.0, 0.5 - 0.25 - 9.0]


def test_reward_and_completion_metrics_by_hand():
    per_func = torch.tensor([[1.0, 0.0], [NAN, 1.0], [NAN, NAN], [3.0, 2.0]], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5], dtype=torch.float64)
    m = adv.reward_metrics(per_func, weights, ["a", "b"], torch.tensor([0.0, 0.0, 1e-9, 0.3]))
    assert m["rewards/a/mean"] == 2.0 and m["rewards/a/std"] == pytest.approx(statistics.stdev([1.0, 3.0]))
    assert m["rewards/b/mean"] == 1.0 and m["rewards/b/std"] == pytest.approx(1.0)
    assert m["reward"] == pytest.approx(statistics.fmean([1.0, 0.5, 4.0]))  # the unscorable row left out
    assert m["reward_std"] == pytest.approx(statistics.stdev([1.0, 0.5, 4.0]))
    assert m["frac_reward_zero_std"] == 0.75  # isclose(1e-9, 0) holds (atol 1e-8)
    c = adv.completion_metrics([[5, 9], [5, 6, 7], [8], [4, 4, 4, 9]], stop_ids={9, 0})
    lengths = (c["completions/mean_length"], c["completions/min_length"], c["completions/max_length"])
    assert lengths == (2.5, 1, 4)
    assert c["completions/clipped_ratio"] == 0.5  # [5, 6, 7] and [8] do not end in a stop id
    assert (c["completions/mean_terminated_length"], c["completions/min_terminated_length"],
            c["completions/max_terminated_length"]) == (3.0, 2, 4)
    assert adv.completion_metrics([[5]], {9})["completions/mean_terminated_length"] == 0.0  # none finished


# -- the round's layout ----------------------------------------------------------------------------------
def test_round_batch_left_pads_prompts_right_pads_completions_and_masks_truncated_ones():
    batch = round_batch([[11, 12, 13], [14]], [[21, 9], [22, 23, 24]], pad_id=0, stop_ids={9, 0},
                        mask_truncated=True)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 9, 0], [0, 0, 14, 22, 23, 24]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0]]  # row 1 was cut
    assert batch["completion_mask"].tolist() == [[1, 1, 0], [0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5]] * 2  # TRL's forward: 0..T-1
    kept = round_batch([[11, 12, 13], [14]], [[21, 9], [22, 23, 24]], 0, {9, 0}, positions="real")
    assert kept["completion_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert kept["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]
    with pytest.raises(ValueError, match="at least one token"):
        round_batch([[1]], [[]], 0, {9})


def test_shuffled_split_takes_training_row_k_from_round_row_permutation_k():
    batch = {"input_ids": torch.arange(12).view(6, 2), "attention_mask": torch.ones(6, 2, dtype=torch.long),
             "advantages": torch.arange(6.0), "tokens_per_micro_batch": 2.5}
    parts = shuffled_split(batch, [4, 0, 5, 1, 3, 2], 3)
    assert [p["advantages"].tolist() for p in parts] == [[4.0, 0.0], [5.0, 1.0], [3.0, 2.0]]
    assert parts[1]["input_ids"].tolist() == [[10, 11], [2, 3]]
    assert all(p["tokens_per_micro_batch"] == 2.5 and p["n_real_tokens"] == 4 for p in parts)
    with pytest.raises(ValueError, match="equal micro-batches"):
        shuffled_split(batch, list(range(6)), 4)
    with pytest.raises(ValueError, match="once"):
        shuffled_split(batch, [0, 0, 1, 2, 3, 4], 3)


def test_when_trl_needs_old_log_probs_and_the_dapo_denominator():
    # TRL: old log-probs unless every micro-step of a round falls in the optimizer step that generated it
    assert not needs_old_logps(grad_accum=2, steps_per_generation=2, num_iterations=1)
    assert not needs_old_logps(grad_accum=4, steps_per_generation=2, num_iterations=1)
    assert needs_old_logps(grad_accum=2, steps_per_generation=2, num_iterations=2)
    assert needs_old_logps(grad_accum=2, steps_per_generation=4, num_iterations=1)
    assert tokens_per_micro_batch(30, world_size=2, steps_per_generation=3) == 5.0
    assert tokens_per_micro_batch(0, 1, 2) == 0.5  # at least one token


def test_round_loader_builds_each_round_when_reached_and_repeats_it_num_iterations_times():
    built = []

    def make_round(r):
        built.append(r)
        return [f"r{r}m0", f"r{r}m1"]
    stream = iter(RoundLoader(make_round, n_rounds=2, num_iterations=2))
    assert [next(stream) for _ in range(4)] == ["r0m0", "r0m1", "r0m0", "r0m1"] and built == [0]
    assert next(stream) == "r1m0" and built == [0, 1]


# -- log-probs -------------------------------------------------------------------------------------------
def _tiny_lm(seed=0, vocab=40):
    torch.manual_seed(seed)
    return build_model(GPTConfig(vocab_size=vocab, n_positions=24, n_embd=16, n_layer=2, n_head=2,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).double()


def _random_round(n=8, seed=0, vocab=40, stop=39):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(1, vocab - 1, (length,), generator=g).tolist()
    prompts = [ids(1, 6) for _ in range(n)]
    completions = [ids(1, 5) + ([stop] if i % 3 else []) for i in range(n)]
    return prompts, completions


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_log_probs_equal_full_logits_at_the_completion_tokens(temperature):
    lm = _tiny_lm()
    prompts, completions = _random_round()
    batch = round_batch(prompts, completions, 0, {39, 0})
    scorer = CompletionLogProbs(lm, temperature)
    logps, entropy = scorer(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                            batch["completion_mask"].shape[1])
    logits = lm(batch["input_ids"], batch["attention_mask"]) / temperature  # every position, positions 0..T-1
    P = batch["input_ids"].shape[1] - batch["completion_mask"].shape[1]
    for i, completion in enumerate(completions):
        for t, token in enumerate(completion):
            dist = torch.log_softmax(logits[i, P + t - 1], dim=-1)
            assert logps[i, t].item() == pytest.approx(dist[token].item(), abs=1e-12)
            assert entropy[i, t].item() == pytest.approx(-(dist.exp() * dist).sum().item(), abs=1e-12)


def test_real_positions_make_log_probs_independent_of_the_padding_trl_positions_do_not():
    lm = _tiny_lm()
    prompts, completions = [[5, 6], [7, 8, 9, 10, 11]], [[12, 13], [14, 15]]
    scorer = CompletionLogProbs(lm)

    def alone(i, positions):
        b = round_batch([prompts[i]], [completions[i]], 0, {39}, positions=positions)
        return scorer(b["input_ids"], b["attention_mask"], b["position_ids"], 2)[0][0]
    for positions, same in (("real", True), ("padded", False)):
        b = round_batch(prompts, completions, 0, {39}, positions=positions)
        together = scorer(b["input_ids"], b["attention_mask"], b["position_ids"], 2)[0]
        gap = (together[0] - alone(0, positions)).abs().max().item()  # row 0 has 3 pads in the round
        assert (gap < 1e-12) == same, (positions, gap)
        assert (together[1] - alone(1, positions)).abs().max().item() < 1e-12  # the longest row: no pads
    real = position_ids(left_pad([[1], [2, 3, 4]], 0)[1], 5, "real")
    assert real.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_completion_logps_in_chunks_equal_one_forward_and_are_zero_where_masked():
    lm = _tiny_lm()
    prompts, completions = _random_round()
    batch = round_batch(prompts, completions, 0, {39, 0}, mask_truncated=True)
    scorer = CompletionLogProbs(lm)
    chunked = completion_logps(scorer, batch, 3, CPU)
    whole = scorer(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                   batch["completion_mask"].shape[1])[0].float()
    mask = batch["completion_mask"].bool()
    assert torch.allclose(chunked[mask], whole[mask], atol=1e-6) and (chunked[~mask] == 0).all()


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_prepare_round_gives_each_rank_its_slice_of_every_micro_batch(algorithm):
    """Two ranks holding the whole round train on the two halves of each micro-batch one process trains on
    (whatever the permutation), with the round's advantages, metrics, padding and the "dapo" denominator
    shared by 2 ranks x 2 micro-batches; RLOO with beta > 0 scores every row."""
    from minift.rl.round import RoundSettings, prepare_round

    lm = _tiny_lm()
    prompts, completions = _random_round(n=8)
    rewards = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    rewards[2, 0] = NAN
    settings = RoundSettings(algorithm=algorithm, num_generations=4, beta=0.1, steps_per_generation=2,
                             grad_accum=2, num_iterations=2, rows_per_forward=3)
    scorer, reference = CompletionLogProbs(lm), CompletionLogProbs(_tiny_lm(seed=1))
    permutation = [5, 2, 7, 0, 3, 6, 1, 4]

    def run(rank, world_size):
        return prepare_round(settings, scorer, reference, prompts, completions, rewards,
                             torch.tensor([1.0, 0.5]), ["a", "b"], 0, {39, 0}, permutation, CPU, rank,
                             world_size)
    one, *ranks = run(0, 1), run(0, 2), run(1, 2)
    assert [p["advantages"].tolist() for p in one.micro_batches] == [
        one.advantages[permutation[:4]].tolist(), one.advantages[permutation[4:]].tolist()]
    assert all(r.metrics == one.metrics for r in ranks)
    tokens = [r.micro_batches[0]["tokens_per_micro_batch"] for r in (one, *ranks)]
    assert tokens[0] == 2 * tokens[1] == 2 * tokens[2]
    for k, whole in enumerate(one.micro_batches):
        for key in ("input_ids", "position_ids", "completion_mask", "advantages", "old_logps", "ref_logps"):
            split = torch.cat([r.micro_batches[k][key] for r in ranks])
            assert torch.allclose(split.double(), whole[key].double(), rtol=0, atol=1e-6), (k, key)
    assert ("kl" in one.metrics) == (algorithm == "rloo") and one.metrics["reward"] == pytest.approx(
        torch.nanmean(rewards[:, 0].nan_to_num(0) + 0.5 * rewards[:, 1]).item(), rel=1e-6)


# -- the objectives against hand formulas ----------------------------------------------------------------
class FixedLogProbs(nn.Module):
    """Stands in for CompletionLogProbs: returns the given per-token log-probs (a parameter) and entropies."""

    def __init__(self, logps, entropy):
        super().__init__()
        self.logps, self.entropy = nn.Parameter(logps.clone()), entropy

    def forward(self, input_ids, attention_mask, position_ids, n_completion):
        return self.logps * 1.0, self.entropy


def _objective_batch(seed=0, B=4, C=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, C, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    mask[3] = 0  # a fully masked completion (truncated, masked)
    logps = -torch.rand(B, C, generator=g, dtype=torch.float64) * 3
    batch = {"input_ids": torch.zeros(B, C + 2, dtype=torch.long), "attention_mask": torch.ones(B, C + 2),
             "position_ids": torch.zeros(B, C + 2, dtype=torch.long), "completion_mask": mask,
             "advantages": torch.tensor([1.3, -0.7, 0.4, -2.0], dtype=torch.float64),
             "old_logps": logps + torch.tensor([[-0.3], [0.3], [0.02], [0.0]], dtype=torch.float64)
             + (torch.rand(B, C, generator=g, dtype=torch.float64) - 0.5) * 0.8,
             "ref_logps": logps + (torch.rand(B, C, generator=g, dtype=torch.float64) - 0.5),
             "tokens_per_micro_batch": 3.5}
    entropy = torch.rand(B, C, generator=g, dtype=torch.float64) * 5
    return batch, logps, entropy


def _hand_grpo(batch, logps, entropy, loss_type, level, beta, eps_lo, eps_hi, max_len=7):
    """TRL's GRPO loss and metrics, one float at a time."""
    m, A = batch["completion_mask"].tolist(), batch["advantages"].tolist()
    lp, old, ref = logps.tolist(), batch["old_logps"].tolist(), batch["ref_logps"].tolist()
    B, C = len(m), len(m[0])
    lp = [[lp[i][t] if m[i][t] else 0.0 for t in range(C)] for i in range(B)]
    coef = []
    for i in range(B):
        if level == "sequence":
            mean = sum((lp[i][t] - old[i][t]) * m[i][t] for t in range(C)) / max(sum(m[i]), 1)
            coef.append([math.exp(mean)] * C)
        else:
            coef.append([math.exp(lp[i][t] - old[i][t]) for t in range(C)])
    token_loss, kl = [[0.0] * C for _ in range(B)], [[0.0] * C for _ in range(B)]
    for i in range(B):
        for t in range(C):
            clipped = min(max(coef[i][t], 1 - eps_lo), 1 + eps_hi)
            token_loss[i][t] = -min(coef[i][t] * A[i], clipped * A[i])
            d = ref[i][t] - lp[i][t]
            kl[i][t] = (math.exp(d) - d - 1) * coef[i][t]
            token_loss[i][t] += beta * kl[i][t]
    sums = [sum(token_loss[i][t] * m[i][t] for t in range(C)) for i in range(B)]
    n_tokens = sum(map(sum, m))
    loss = {"grpo": sum(s / max(sum(m[i]), 1) for i, s in enumerate(sums)) / B,
            "bnpo": sum(sums) / max(n_tokens, 1), "dr_grpo": sum(sums) / (B * max_len),
            "dapo": sum(sums) / batch["tokens_per_micro_batch"]}[loss_type]
    metrics = {"entropy": sum(entropy[i][t].item() * m[i][t] for i in range(B) for t in range(C)) / n_tokens,
               "kl": sum(kl[i][t] * m[i][t] for i in range(B) for t in range(C)) / n_tokens}
    low = [[float(coef[i][t] < 1 - eps_lo and A[i] < 0) for t in range(C)] for i in range(B)]
    high = [[float(coef[i][t] > 1 + eps_hi and A[i] > 0) for t in range(C)] for i in range(B)]
    if level == "sequence":
        per_row = {"low": [low[i][0] for i in range(B)], "high": [high[i][0] for i in range(B)]}
        metrics["clip_ratio/low_mean"] = sum(per_row["low"]) / B
        metrics["clip_ratio/high_mean"] = sum(per_row["high"]) / B
        metrics["clip_ratio/region_mean"] = sum(max(a, b) for a, b in zip(*per_row.values())) / B
    else:
        def share(flags):
            return sum(flags[i][t] * m[i][t] for i in range(B) for t in range(C)) / n_tokens
        metrics["clip_ratio/low_mean"], metrics["clip_ratio/high_mean"] = share(low), share(high)
        region = [[max(a, b) for a, b in zip(x, y)] for x, y in zip(low, high)]
        metrics["clip_ratio/region_mean"] = share(region)
        per_row = {k: [sum(f[i][t] * m[i][t] for t in range(C)) / sum(m[i]) for i in range(B) if sum(m[i])]
                   for k, f in (("low", low), ("high", high))}
    metrics["clip_ratio/low_min"], metrics["clip_ratio/high_max"] = min(per_row["low"]), max(per_row["high"])
    return loss, metrics


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_grpo_objective_equals_trl_formulas_by_hand(loss_type, level, beta):
    batch, logps, entropy = _objective_batch()
    objective = GRPOObjective(loss_type=loss_type, epsilon_low=0.1, epsilon_high=0.15,
                              importance_sampling_level=level, beta=beta, max_completion_length=7)
    out = objective(FixedLogProbs(logps, entropy), batch, CPU)
    want, metrics = _hand_grpo(batch, logps, entropy, loss_type, level, beta, 0.1, 0.15)
    assert out.loss_sum.item() == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert objective.count(batch) == 1
    assert ("kl" in out.metric_sums) == (beta != 0)
    for name, value in metrics.items():
        if name in out.metric_sums:
            assert out.metric_sums[name].item() == pytest.approx(value, rel=1e-6, abs=1e-7), name
    assert out.metric_sums[COUNT_PREFIX + "clip_ratio/low_min"].item() == 1.0
    assert 0 < metrics["clip_ratio/region_mean"] < 1  # some tokens clipped, some not: both branches checked


def test_grpo_on_policy_gradient_is_the_advantage_weighted_log_prob_gradient():
    """Without old log-probs the ratio is exp(logp - logp.detach()) = 1 and the gradient of the "dapo" loss
    with respect to each completion token's log-prob is -A / tokens_per_micro_batch."""
    batch, logps, entropy = _objective_batch()
    del batch["old_logps"]
    model = FixedLogProbs(logps, entropy)
    GRPOObjective().__call__(model, batch, CPU).loss_sum.backward()
    want = -batch["advantages"][:, None] * batch["completion_mask"] / batch["tokens_per_micro_batch"]
    assert torch.allclose(model.logps.grad, want, rtol=0, atol=1e-15)


def test_rloo_objective_equals_trl_formulas_by_hand():
    batch, logps, entropy = _objective_batch()
    out = RLOOObjective(epsilon_low=0.1, epsilon_high=0.3)(FixedLogProbs(logps, entropy), batch, CPU)
    m, A = batch["completion_mask"].tolist(), batch["advantages"].tolist()
    losses, low, high = [], [], []
    for i in range(4):
        log_ratio = sum((logps[i, t].item() - batch["old_logps"][i, t].item()) * m[i][t] for t in range(5))
        coef = math.exp(log_ratio)
        losses.append(-min(coef * A[i], min(max(coef, 0.9), 1.3) * A[i]))
        low.append(float(coef < 0.9 and A[i] < 0))
        high.append(float(coef > 1.3 and A[i] > 0))
    assert out.loss_sum.item() == pytest.approx(statistics.fmean(losses), rel=1e-12)
    assert out.metric_sums["clip_ratio/low_mean"].item() == pytest.approx(statistics.fmean(low))
    assert out.metric_sums["clip_ratio/high_max"].item() == max(high)
    assert out.metric_sums["entropy"].item() == pytest.approx(
        (entropy * batch["completion_mask"]).sum().item() / batch["completion_mask"].sum().item(), rel=1e-6)


def test_finish_step_metrics_averages_only_micro_batches_that_had_a_value():
    # two micro-batches: low_min 0.25 and "none" (every completion masked): the loop logs sums / 2
    record = {"step": 1, "clip_ratio/low_min": (0.25 + 0.0) / 2, "clip_ratio/high_max": 0.0,
              COUNT_PREFIX + "clip_ratio/low_min": (1 + 0) / 2, COUNT_PREFIX + "clip_ratio/high_max": 0.0}
    assert finish_step_metrics(record) == {"step": 1, "clip_ratio/low_min": 0.25, "clip_ratio/high_max": None}


def test_objective_refuses_unknown_settings():
    with pytest.raises(ValueError, match="loss_type"):
        GRPOObjective(loss_type="cispo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        GRPOObjective(importance_sampling_level="segment")
    with pytest.raises(ValueError, match="max_completion_length"):
        GRPOObjective(loss_type="dr_grpo")


# -- the loop runs TRL's aggregation ---------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
def test_loop_with_accumulation_reproduces_trl_step_written_by_hand(loss_type):
    """One optimizer step of 2 micro-batches out of a round split in 4 (steps_per_generation 4, grad_accum 2),
    old log-probs from the round's weights: the loop's update equals SGD on TRL's step loss, written here
    from its definition (each micro-batch normalised on its own, then divided by the 2 micro-batches)."""
    prompts, completions = _random_round(n=8)
    batch = round_batch(prompts, completions, 0, {39, 0})
    mask = batch["completion_mask"].double()
    lm = _tiny_lm()
    reference_lm = copy.deepcopy(lm)
    g = torch.Generator().manual_seed(1)
    noise = 0.05 * torch.randn(8, mask.shape[1], generator=g, dtype=torch.float64) * mask
    batch.update(advantages=torch.randn(8, generator=g, dtype=torch.float64),
                 old_logps=completion_logps(CompletionLogProbs(lm), batch, 8, CPU).double() + noise,
                 tokens_per_micro_batch=tokens_per_micro_batch(int(mask.sum()), 1, 4))
    order = torch.randperm(8, generator=g)
    parts = shuffled_split(batch, order, 4)
    objective = GRPOObjective(loss_type=loss_type, epsilon_low=0.02, epsilon_high=0.03,
                              max_completion_length=6)
    policy = CompletionLogProbs(lm)
    records = []
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    train(policy, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0),
          RoundLoader(lambda r: parts, 1), total_steps=1, grad_accum=2, max_grad_norm=0.0, loss=objective,
          hooks=Hooks(log=records.append))

    # by hand: TRL's definitions, micro-batch by micro-batch
    manual = CompletionLogProbs(reference_lm)
    step_loss = 0.0
    for part in parts[:2]:
        logps, _ = manual(part["input_ids"], part["attention_mask"], part["position_ids"], mask.shape[1])
        m = part["completion_mask"].double()
        coef = torch.exp(logps * m - part["old_logps"])
        a = part["advantages"][:, None]
        token = -torch.min(coef * a, coef.clamp(0.98, 1.03) * a) * m
        per_micro_batch = {"dapo": token.sum() / (batch["completion_mask"].sum().item() / 4),  # round / 4
                           "bnpo": token.sum() / m.sum(),
                           "grpo": (token.sum(1) / m.sum(1).clamp(min=1)).mean(),
                           "dr_grpo": token.sum() / (m.shape[0] * 6)}[loss_type]
        step_loss = step_loss + per_micro_batch / 2
    step_loss.backward()
    with torch.no_grad():
        for p in reference_lm.parameters():
            p -= 0.5 * p.grad
    assert records[0]["loss"] == pytest.approx(step_loss.item(), rel=1e-12)
    for (name, mine), theirs in zip(lm.named_parameters(), reference_lm.parameters()):
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-13), name
    assert 0 < records[0]["clip_ratio/region_mean"] < 1


# -- the completions file --------------------------------------------------------------------------------
def test_completions_file_round_trip(tmp_path):
    rounds = [ReplayRound(1, ["a b", "a b", "c", "c"], [[5, 9], [6], [7, 7, 7], [8]],
                          permutation=[2, 0, 3, 1]),
              ReplayRound(2, ["d"] * 4, [[1], [2], [3], [4]], prompt_ids=[[4, 4]] * 4)]
    path = tmp_path / "completions.jsonl"
    write_replay(path, rounds)
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"step": 1, "prompt": "a b", "completion_ids": [5, 9], "position": 1}
    assert read_replay(path, num_generations=2) == rounds
    with ReplayWriter(path, append=True) as writer:
        writer.write_round(3, ["e", "e"], [[1], [2]])
    assert [r.step for r in read_replay(path, num_generations=2)] == [1, 2, 3]


@pytest.mark.parametrize("lines,message", [
    (['{"step": 1, "prompt": "p", "completion_ids": [1]}', "not json"], r":2: not JSON"),
    (['{"step": 1, "prompt": "p"}'], r":1: missing \['completion_ids'\]"),
    (['{"step": 1, "prompt": "p", "completion_ids": []}'], r":1: 'completion_ids' must be a non-empty list"),
    (['{"step": 1, "prompt": "p", "completion_ids": [1], "reward": 2}'],
     r":1: unknown key\(s\) \['reward'\]"),
    (['{"step": 2, "prompt": "p", "completion_ids": [1]}'], r":1: step 2 where step 1 was expected"),
    (['{"step": 1, "prompt": "p", "completion_ids": [1]}',
      '{"step": 1, "prompt": "q", "completion_ids": [1]}'],
     r":1: the 2 completions from this line on must share one prompt"),
    (['{"step": 1, "prompt": "p", "completion_ids": [1], "position": 0}',
      '{"step": 1, "prompt": "p", "completion_ids": [1]}'],
     r":2: 'position' must be on every record of round 1"),
    (['{"step": 1, "prompt": "p", "completion_ids": [1], "position": 1}',
      '{"step": 1, "prompt": "p", "completion_ids": [2], "position": 1}'], r"'position' must number"),
])
def test_completions_file_errors_name_the_line(tmp_path, lines, message):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReplayError, match=message):
        read_replay(path, num_generations=2 if len(lines) > 1 else None)


# -- against TRL -----------------------------------------------------------------------------------------
def _compare_steps(mine: list[dict], theirs: list[dict]) -> None:
    """float32 on both sides, the same completions and order: TRL's and minift's per-step numbers agree to
    float32 rounding (observed ≤ 4e-6 on entropies near 10.8, ≤ 1e-6 elsewhere)."""
    assert len(mine) == len(theirs)
    for step, (m, t) in enumerate(zip(mine, theirs), start=1):
        for key in STEP_KEYS:
            if key in t:
                assert m.get(key) is not None, (step, key)
                assert m[key] == pytest.approx(t[key], abs=1e-5, rel=1e-5), (step, key)


def _trace_rounds(setting: dict, tmp_path):
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "prompt_ids"}) + "\n"
                            for r in setting["completions"]))
    return read_replay(path, num_generations=setting["config"]["num_generations"])


@pytest.mark.shared
@pytest.mark.parametrize("name", [n if n in DEFAULT_SUITE else pytest.param(n, marks=pytest.mark.slow)
                                  for n in SETTINGS])
def test_against_trl_trace(name, tmp_path):
    """minift replays the completions TRL sampled (saved in tests/data; regenerate: python3 tests/trl_rl.py)
    and gets TRL's per-step loss, grad norm, KL, entropy, clip ratios, rewards and final weights."""
    shared_path("fixtures", "tiny-gpt2")
    trace = json.loads(TRACE.read_text())
    setting = trace["settings"][name]
    assert setting["config"] == json.loads(json.dumps(config(name)))  # the trace is of these settings
    rounds = _trace_rounds(setting, tmp_path)  # the prompts as text, tokenized by minift
    records, params = run_minift(name, rounds)
    _compare_steps(records, setting["steps"])
    mine = weight_digest(params)
    assert mine.keys() == setting["final_weights"].keys()
    for tensor, digest in setting["final_weights"].items():
        for kind in ("sum", "projection"):
            bound = max(2e-4, 1e-5 * params[tensor].numel() ** 0.5)  # elements within 1e-5, signs independent
            assert mine[tensor][kind] == pytest.approx(digest[kind], abs=bound, rel=0), (tensor, kind)


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.requires("trl", "transformers")
@pytest.mark.parametrize("name", [*SETTINGS, *(f"random_{seed}" for seed in (*range(1, 11), 17))])
def test_against_trl_live(tmp_path, name):
    """TRL's GRPOTrainer / RLOOTrainer run here and sample; minift replays the completions file written from
    what they sampled. Final weights compared element by element. ``random_<seed>``: a setting drawn from
    TRL's options with that seed (``trl_rl.random_setting``), also TRL's seed: settings and completions
    nobody chose."""
    from trl_rl import replay_rounds

    logs, rounds, their_params = run_trl(name, tmp_path / "trl")
    path = tmp_path / "completions.jsonl"
    write_replay(path, replay_rounds(rounds))
    replayed = read_replay(path, num_generations=config(name)["num_generations"])
    without_ids = [ReplayRound(r.step, r.prompts, r.completion_ids, None, r.permutation) for r in replayed]
    records, my_params = run_minift(name, without_ids)  # the prompts as text, tokenized by minift
    _compare_steps(records, logs)
    for tensor, mine in my_params.items():
        torch.testing.assert_close(mine, their_params[tensor], rtol=0, atol=1e-5)


# -- DDP ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_ranks_equal_one_process_with_the_doubled_micro_batches(tmp_path):
    """Each objective on 2 gloo ranks (8 rows each) equals one process with both ranks' rows in every
    micro-batch: weights, loss, and the metrics TRL reduces over ranks (token means, min / max)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = str(REPO / "tests" / "rl_ddp.py")
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29547"]
    for out, launcher in (("one.json", []), ("two.json", torchrun)):
        result = subprocess.run([sys.executable, *launcher, script, str(tmp_path / out)], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one.keys() == two.keys() == {"dapo_beta", "grpo_sequence", "dr_grpo", "rloo"}
    for name in one:
        for tensor, values in one[name]["weights"].items():
            assert two[name]["weights"][tensor] == pytest.approx(values, abs=1e-12), (name, tensor)
        for key, value in one[name]["record"].items():
            if key in ("loss", "kl", "entropy") or key.startswith("clip_ratio/"):
                assert two[name]["record"][key] == pytest.approx(value, abs=1e-6), (name, key)
        assert 0 < one[name]["record"]["clip_ratio/region_mean"] < 1, name


# -- docs/grpo.md -----------------------------------------------------------------------------------------
def _grpo_map():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("update_grpo_map", REPO / "docs" / "update_grpo_map.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.DOC.read_text(encoding="utf-8")


def test_grpo_doc_cites_minift_lines_that_hold_the_quoted_code():
    grpo_map, text = _grpo_map()
    assert len(grpo_map.trainer_map.cited(text)) >= 40
    assert grpo_map.check(text, root=None) == []


@pytest.mark.slow  # importing trl to read its version takes ~2 s
def test_grpo_doc_cites_trl_lines_that_hold_the_quoted_code():
    grpo_map, text = _grpo_map()
    root, versions = grpo_map.trainer_map.upstream_root(grpo_map.cited_packages(text))
    if root is None:
        pytest.skip(f"TRL half not checked: {versions}")
    assert grpo_map.check(text, root) == []


@pytest.mark.slow
@pytest.mark.shared
def test_grpo_doc_shows_what_its_numbers_script_prints(capsys):
    import importlib.util

    from conftest import REPO

    shared_path("fixtures", "tiny-gpt2")
    spec = importlib.util.spec_from_file_location("grpo_numbers", REPO / "docs" / "grpo_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    printed = capsys.readouterr().out
    text = (REPO / "docs" / "grpo.md").read_text(encoding="utf-8")
    missing = [line for line in printed.splitlines() if line and line not in text]
    assert not missing, missing
