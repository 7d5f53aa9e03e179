"""train.compat = "trainer": each behaviour against an independent reference, then the whole run
against transformers' Trainer itself (benchmarks/trainer_side_by_side.py)."""
from __future__ import annotations

import json
import math
import random
import sys

import pytest
import torch
import torch.nn.functional as F

from minift.config import RunConfigError, from_dict, load_config
from minift.evaluate import EvalData, evaluate, trainer_eval_loss
from minift.metrics import MetricsLogger
from minift.sampling import make_sampler, trainer_eval_batches, trainer_length_grouped_indices

from conftest import REPO, shared_path

LENGTHS = [random.Random(5).randint(2, 70) for _ in range(403)]


# -- settings ----------------------------------------------------------------------------------------
def test_compat_fills_trainers_defaults_but_keeps_what_the_user_wrote():
    minift_defaults = from_dict({})
    trainer = from_dict({"train": {"compat": "trainer", "grad_accum": 4},
                         "data": {"sampler": "length_grouped"}})
    assert (minift_defaults.train.seed, minift_defaults.train.epochs, minift_defaults.data.sampler) == \
        (0, 1.0, "length_grouped")
    assert (trainer.train.seed, trainer.train.epochs, trainer.train.log_every, trainer.eval.batch_size) == \
        (42, 3.0, 500, 8)
    assert trainer.train.loss_denominator == "trainer"
    assert trainer.train.grad_accum == 4 and trainer.data.sampler == "length_grouped"  # written: kept
    by_set = load_config(None, ["train.compat=trainer", "train.seed=3"])
    assert by_set.train.seed == 3 and by_set.train.grad_accum == 1


def test_compat_reads_warmup_below_one_as_trainers_ratio():
    cfg = from_dict({"train": {"compat": "trainer", "warmup_steps": 0.1}})
    assert (cfg.train.warmup_steps, cfg.train.warmup_ratio) == (0, 0.1)
    assert from_dict({"train": {"compat": "trainer", "warmup_steps": 3.0}}).train.warmup_steps == 3
    with pytest.raises(RunConfigError, match="warmup_steps must be int"):  # outside compat: minift's types
        from_dict({"train": {"warmup_steps": 0.1}})
    with pytest.raises(RunConfigError, match="not both"):
        from_dict({"train": {"compat": "trainer", "warmup_steps": 0.1, "warmup_ratio": 0.2}})
    with pytest.raises(RunConfigError, match="train.compat 'hf'"):
        from_dict({"train": {"compat": "hf"}})


# -- sampling ----------------------------------------------------------------------------------------
def test_trainer_random_order_is_randperm_seeded_seed_plus_epoch():
    sampler = make_sampler("random", LENGTHS, 16, seed=42, order="trainer")
    for epoch in (0, 3):
        expected = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(42 + epoch)).tolist()
        assert [i for batch in sampler.batches(epoch) for i in batch] == expected


def test_trainer_megabatches_cover_an_optimizer_step_sorted_with_the_longest_first():
    sampler = make_sampler("length_grouped", LENGTHS, 4, seed=42, order="trainer", grad_accum=3)
    flat = [i for batch in sampler.batches(0) for i in batch]
    assert sorted(flat) == list(range(len(LENGTHS))) and len(sampler.batches(0)[0]) == 4
    assert LENGTHS[flat[0]] == max(LENGTHS)
    megabatch = min(len(LENGTHS) // (4 * 3 * 4), 50) * 4 * 3  # 8 optimizer steps of 12 sequences
    for start in range(megabatch, len(flat), megabatch):  # first one: its head was swapped in
        chunk = [LENGTHS[i] for i in flat[start:start + megabatch]]
        assert chunk[1:] == sorted(chunk[1:], reverse=True)


@pytest.mark.parametrize("kind", ["random", "length_grouped"])
def test_trainer_samplers_restore_mid_epoch(kind):
    def fresh():
        return make_sampler(kind, LENGTHS, 8, seed=9, order="trainer", grad_accum=2)

    expected = fresh().batches(1)
    run = fresh()
    run.set_epoch(1)
    run.consumed = 11
    restored = fresh()
    restored.load_state_dict(run.state_dict())
    assert expected[:11] + list(restored) == expected


@pytest.mark.requires("transformers")
def test_length_grouped_indices_equal_transformers():
    from transformers.trainer_pt_utils import get_length_grouped_indices

    for seed, n, batch_size in [(0, 403, 4), (1, 403, 32), (2, 17, 8), (3, 1000, 1)]:
        lengths = LENGTHS[:n] if n <= len(LENGTHS) else [random.Random(seed).randint(1, 99) for _ in range(n)]
        theirs = get_length_grouped_indices(lengths, batch_size,
                                            generator=torch.Generator().manual_seed(seed))
        assert trainer_length_grouped_indices(lengths, batch_size,
                                              torch.Generator().manual_seed(seed)) == theirs


# -- evaluation ----------------------------------------------------------------------------------------
class _Bigram(torch.nn.Module):
    """A model whose cross-entropy is easy to compute independently."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(11, 11, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None, labels=None, right_padded=None):
        from minift.models.layers import LossOutput

        logits = self.table[input_ids[:, :-1]]
        targets = labels[:, 1:]
        return LossOutput(F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100,
                                          reduction="sum"), int((targets != -100).sum()))


def test_trainer_eval_loss_divides_each_batch_by_its_count_and_weights_by_sequences():
    from minift.collate import Collator

    rows = [[1, 2, 3, 4, 5, 6, 7], [3, 4], [5, 6, 7], [8, 9, 10, 1, 2], [2, 3]]
    collate = Collator(pad_id=0)
    batches = [collate([{"input_ids": r} for r in rows[:3]]), collate([{"input_ids": r} for r in rows[3:]])]
    data = EvalData(batches, prompts=[], gold=[], label_ids=[[1]], pad_id=0)
    result = evaluate(_Bigram(), data, accuracy=False, loss_formula="trainer")
    token_weighted = evaluate(_Bigram(), data, accuracy=False)

    table = _Bigram().table.detach()
    ce = [[float(F.cross_entropy(table[r[:-1]], torch.tensor(r[1:]), reduction="sum"))] for r in rows]
    first = sum(c[0] for c in ce[:3]) / sum(len(r) for r in rows[:3])  # unshifted count: every real token
    second = sum(c[0] for c in ce[3:]) / sum(len(r) for r in rows[3:])
    assert result.loss == pytest.approx((3 * first + 2 * second) / 5, rel=1e-6)
    assert token_weighted.loss == pytest.approx(sum(c[0] for c in ce) / sum(len(r) - 1 for r in rows),
                                                rel=1e-6)
    assert result.perplexity == pytest.approx(token_weighted.perplexity)  # perplexity stays per target
    assert trainer_eval_loss([(6.0, 3, 1), (1.0, 1, 3)]) == pytest.approx((2.0 + 3 * 1.0) / 4)


def test_trainer_eval_batches_are_length_grouped_with_their_own_seed():
    lengths = LENGTHS[:37]
    plain = trainer_eval_batches(lengths, 8, seed=5, group_by_length=False)
    assert plain == [list(range(s, min(s + 8, 37))) for s in range(0, 37, 8)]
    grouped = trainer_eval_batches(lengths, 8, seed=5, group_by_length=True)
    expected = trainer_length_grouped_indices(lengths, 8, torch.Generator().manual_seed(5))
    assert [i for b in grouped for i in b] == expected \
        and grouped == trainer_eval_batches(lengths, 8, 5, True)


# -- logging ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window_mean", [False, True])
def test_logged_loss_is_the_mean_of_the_window(tmp_path, window_mean):
    logger = MetricsLogger(tmp_path, 7, progress=False, log_every=3, window_mean=window_mean)
    losses = [5.0, 4.0, 6.0, 1.0, 2.0, 9.0, 7.0]
    for step, loss in enumerate(losses, start=1):
        logger({"step": step, "loss": loss, "lr": 0.1 * step})
    logger.close()
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in written] == [3, 6]  # step 7 starts a window that never closes
    assert [r["loss"] for r in written] == ([5.0, 4.0] if window_mean else [6.0, 9.0])
    assert [r["lr"] for r in written] == pytest.approx([0.3, 0.6])


def test_compat_run_logs_trainers_window_means_of_the_shared_trace(tmp_path):
    """transformers-free: the shared Trainer trace's per-step losses, averaged as logging_steps=4 would."""
    from minift.finetune import run

    trace = json.loads(shared_path("fixtures", "trainer_trace", "trace.json").read_text())["steps"]
    cfg = load_config(REPO / "configs" / "trainer-trace.toml", [
        f'model.name="{shared_path("fixtures", "tiny-openai-gpt")}"',
        f'data.source="{shared_path("data", "tweet_sentiment_extraction")}"', "train.compat=trainer",
        "train.log_every=4", f'train.output_dir="{tmp_path}"', "train.progress=false", "train.plot=false",
        "eval.max_examples=20", "eval.accuracy=false", "eval.before_training=false"])
    assert (cfg.train.seed, cfg.train.grad_accum, cfg.eval.batch_size) == (42, 2, 8)  # the file's 2 kept
    run(cfg, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "step_time" in r]
    assert [r["step"] for r in logged] == [4, 8]
    means = [sum(s["loss"] for s in trace[i:i + 4]) / 4 for i in (0, 4)]
    assert [r["loss"] for r in logged] == pytest.approx(means, abs=1e-5)
    assert [r["step_loss"] for r in logged] == pytest.approx([trace[3]["loss"], trace[7]["loss"]], abs=1e-5)
    assert [r["lr"] for r in logged] == pytest.approx([trace[3]["learning_rate"], trace[7]["learning_rate"]],
                                                      rel=1e-9)
    evals = [r["eval"] for r in records if "eval" in r]
    # Trainer's count is larger
    assert len(evals) == 1 and evals[0]["loss"] < math.log(evals[0]["perplexity"])


# -- the whole run, beside Trainer ------------------------------------------------------------------------
@pytest.mark.requires("transformers")
@pytest.mark.parametrize("model,extra", [
    ("tiny-openai-gpt", []),
    pytest.param("tiny-gpt2", ["--seed", "7", "--batch-size", "3", "--grad-accum", "3", "--log-every", "3",
                               "--steps", "9", "--rows", "50", "--eval-batch-size", "5", "--eval-rows", "23"],
                 marks=pytest.mark.slow),
])
def test_side_by_side_with_trainer(model, extra):
    shared_path("fixtures", model)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import trainer_side_by_side
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    # the feature rows have their own tests (test_trainer_features.py)
    results = trainer_side_by_side.main(["--model", model, "--features", *extra])
    assert set(results) == {"random", "group_by_length"}
    for sampling, r in results.items():
        trainer_steps, minift_steps = r["logged_steps"]
        assert trainer_steps == minift_steps and len(trainer_steps) >= 3, sampling
        assert trainer_steps[0] > 1  # logging windows of more than one step
        assert r["loss"] <= 1e-4 and r["lr"] == 0.0 and r["grad_norm"] <= 1e-4, (sampling, r)
        assert r["eval_loss"] <= 1e-4 and r["weights"] <= 1e-5 and r["weight_tensors"] >= 26, (sampling, r)


def test_compat_refuses_the_packed_sampler_trainer_does_not_have():
    from minift.config import RunConfigError, load_config

    with pytest.raises(RunConfigError, match="no packed sampler"):
        load_config(None, ["train.compat=trainer", "data.sampler=packed"])
