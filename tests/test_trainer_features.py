"""Trainer's features in minift, each against an independent reference: the piece against
transformers' own code (LabelSmoother, neftune_post_forward_hook, DefaultFlowCallback,
EarlyStoppingCallback, rotate_checkpoints, get_scheduler) or a float64 computation, then the whole
run beside Trainer (benchmarks/trainer_side_by_side.py: one row per feature), then exact resume."""
from __future__ import annotations

import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config
from safetensors.torch import load_file

from minift.config import RunConfigError, from_dict, load_config
from minift.loop import Hooks, LoaderSteps, TrainState
from minift.models.lm_loss import label_smoothed_sums
from minift.neftune import NEFTune, TrainerRNG
from minift.sampling import SequentialSampler, make_sampler, trainer_eval_batches
from minift.selection import ModelSelection

from conftest import shared_path


# -- label smoothing ------------------------------------------------------------------------------------
def _smoothing_case(seed=0, vocab=11):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (3, 7), generator=generator)
    labels[0, 5:] = -100  # padding
    labels[2, :3] = -100  # a prompt left out of the loss
    return logits, labels


def test_label_smoothed_sums_follow_the_definition_in_float64():
    logits, labels = _smoothing_case()
    epsilon = 0.2
    total = nll = 0.0
    count = 0
    for b in range(3):
        for t in range(6):  # position t predicts label t + 1
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            log_p = [float(x) for x in F.log_softmax(logits[b, t], dim=-1)]
            nll += -log_p[target]
            total += (1 - epsilon) * -log_p[target] + epsilon * sum(-x for x in log_p) / len(log_p)
            count += 1
    smoothed, ce, n = label_smoothed_sums(logits, labels, epsilon)
    assert n == count == int((labels[:, 1:] != -100).sum())
    assert float(smoothed) == pytest.approx(total, rel=1e-12) and float(ce) == pytest.approx(nll, rel=1e-12)


@pytest.mark.requires("transformers")
@pytest.mark.parametrize("epsilon", [0.1, 0.35])
def test_label_smoothing_equals_transformers_label_smoother(epsilon):
    from transformers.trainer_pt_utils import LabelSmoother

    logits, labels = _smoothing_case(seed=3)
    num_items = int((labels != -100).sum())  # Trainer's unshifted count for GPT-1/GPT-2
    theirs = LabelSmoother(epsilon=epsilon)({"logits": logits}, labels, shift_labels=True,
                                            num_items_in_batch=num_items)
    smoothed, _, _ = label_smoothed_sums(logits, labels, epsilon)
    # float64 logits; LabelSmoother sums the vocabulary term in float32 (dtype=torch.float32)
    assert float(smoothed / num_items) == pytest.approx(float(theirs), rel=1e-7)


def test_padded_vocabulary_rows_do_not_count_in_the_mean():
    """The loss object takes the model's logits, which cover the true vocabulary only."""
    from minift.collate import Collator
    from minift.label_smoothing import LabelSmoothedLoss
    from minift.models import build_model
    from minift.models.config import GPTConfig

    config = GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                       embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    plain = build_model(config)
    padded = build_model(config)
    padded.load_state_dict(plain.state_dict())
    padded.pad_vocab(64)
    batch = Collator(pad_id=49)([{"input_ids": [1, 5, 7, 9, 2]}, {"input_ids": [3, 4, 8]}])
    loss = LabelSmoothedLoss(epsilon=0.3)
    with torch.no_grad():
        a, b = loss(plain, batch, torch.device("cpu")), loss(padded, batch, torch.device("cpu"))
        logits = plain(batch["input_ids"], batch["attention_mask"])
    assert padded.padded_head_weight.shape[0] == 64
    assert float(a.loss_sum) == pytest.approx(float(b.loss_sum), rel=1e-6)
    expected, _, _ = label_smoothed_sums(logits, batch["labels"], 0.3)
    assert float(a.loss_sum) == pytest.approx(float(expected), rel=1e-6)


# -- NEFTune ---------------------------------------------------------------------------------------------
@pytest.mark.requires("transformers")
def test_neftune_hook_adds_transformers_noise_from_the_same_rng():
    from transformers.integrations.neftune import neftune_post_forward_hook

    embedding = torch.nn.Embedding(30, 12)
    ids = torch.randint(0, 30, (3, 9), generator=torch.Generator().manual_seed(1))
    outputs = []
    for hook in (neftune_post_forward_hook, NEFTune(4.0)):
        embedding.neftune_noise_alpha = 4.0
        handle = embedding.register_forward_hook(hook)
        torch.manual_seed(11)
        outputs.append(embedding(ids))
        handle.remove()
    clean = embedding(ids)
    assert torch.equal(outputs[0], outputs[1])
    bound = 4.0 / math.sqrt(9 * 12)
    assert 0.5 * bound < float((outputs[1] - clean).detach().abs().max()) <= bound * (1 + 1e-6)
    embedding.eval()
    handle = embedding.register_forward_hook(NEFTune(4.0))
    assert torch.equal(embedding(ids), clean)  # no noise outside training
    handle.remove()


def test_trainer_rng_replays_the_global_stream_of_a_trainer_run():
    """What Trainer's global RNG does, done by hand: seed; epoch 0's DataLoader draw; two micro-batches'
    noise; an evaluation's DataLoader draw; epoch 1's DataLoader draw (and group_by_length's permutation)."""
    for permuted in (0, 13):
        torch.manual_seed(5)
        torch.empty((), dtype=torch.int64).random_()
        if permuted:
            torch.randperm(permuted)
        expected = [torch.zeros(2, 4, 3).uniform_(-0.1, 0.1), torch.zeros(2, 5, 3).uniform_(-0.1, 0.1)]
        torch.empty((), dtype=torch.int64).random_()
        torch.empty((), dtype=torch.int64).random_()
        if permuted:
            torch.randperm(permuted)
        expected.append(torch.zeros(1, 4, 3).uniform_(-0.1, 0.1))

        rng = TrainerRNG(5, torch.device("cpu"), permuted)
        torch.manual_seed(999)  # the replay never touches the global RNG
        state = torch.get_rng_state()
        got = [rng.uniform_(torch.zeros(2, 4, 3), -0.1, 0.1), rng.uniform_(torch.zeros(2, 5, 3), -0.1, 0.1)]
        rng.evaluation()
        rng.epoch_ended()
        resumed = TrainerRNG(0, torch.device("cpu"), permuted)  # a resume restores the entries in place
        for key, value in rng.checkpoint_entries().items():
            resumed.checkpoint_entries()[key].copy_(value)
        got.append(resumed.uniform_(torch.zeros(1, 4, 3), -0.1, 0.1))
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert torch.equal(torch.get_rng_state(), state)


# -- evaluation and checkpoint cadence -----------------------------------------------------------------
def _trainer_flow(strategy_eval, strategy_save, eval_steps, save_steps, steps_per_epoch, max_steps):
    """Steps at which Trainer's DefaultFlowCallback asks for an evaluation and a save."""
    from transformers.trainer_callback import DefaultFlowCallback, TrainerControl, TrainerState

    args = SimpleNamespace(logging_first_step=False, logging_strategy="no", eval_strategy=strategy_eval,
                           eval_delay=0, save_strategy=strategy_save)
    state = TrainerState(max_steps=max_steps, eval_steps=eval_steps, save_steps=save_steps, logging_steps=500)
    flow, control = DefaultFlowCallback(), TrainerControl()
    evals, saves = [], []
    for step in range(1, max_steps + 1):
        control.should_evaluate = control.should_save = False
        state.global_step = step
        flow.on_step_end(args, state, control)
        epoch_end = step % steps_per_epoch == 0 or control.should_training_stop
        if epoch_end:  # Trainer leaves the epoch loop after the last step: on_epoch_end follows
            state.epoch = step / steps_per_epoch
            flow.on_epoch_end(args, state, control)
        evals += [step] if control.should_evaluate else []
        saves += [step] if control.should_save else []
    return evals, saves


@pytest.mark.requires("transformers")
def test_evaluation_and_checkpoint_cadence_equal_default_flow_callback():
    cases = random.Random(0)
    for _ in range(60):
        strategy = cases.choice(["steps", "epoch"])
        every, per_epoch, total = cases.randint(1, 5), cases.randint(1, 6), cases.randint(1, 20)
        theirs_eval, theirs_save = _trainer_flow(strategy, strategy, every, every, per_epoch, total)
        steps = every if strategy == "steps" else 0
        hooks = Hooks(evaluate=print, checkpoint=print, eval_every=steps, checkpoint_every=steps,
                      eval_per_epoch=strategy == "epoch", checkpoint_per_epoch=strategy == "epoch")
        due = [hooks.due(s, total, s % per_epoch == 0) for s in range(1, total + 1)]
        assert [s for s, (e, _) in enumerate(due, 1) if e] == theirs_eval, (strategy, every, per_epoch, total)
        # the last step's checkpoint is the one the orchestration writes after the loop
        assert sorted({s for s, (_, c) in enumerate(due, 1) if c} | {total}) == theirs_save


def test_loader_steps_report_each_window_where_it_ends_when_fetched_ahead():
    """A step source read one window ahead (as the CUDA prefetch does) still moves the sampler to
    the finished step's own position, also across epoch ends."""
    from torch.utils.data import DataLoader

    sampler = SequentialSampler(10, 2)  # 5 batches per epoch: windows of 2, 2, 1
    loader = DataLoader(list(range(10)), batch_sampler=sampler, collate_fn=lambda rows: {"input_ids": rows})
    steps = LoaderSteps(loader, grad_accum=2)
    windows = iter(steps)
    ahead = next(windows)
    seen = []
    for _ in range(7):
        window, ahead = ahead, next(windows)
        done = steps.step_done(window)
        seen.append((sampler.epoch, sampler.consumed, done["epoch_end"]))
    assert seen == [(0, 2, False), (0, 4, False), (0, 5, True), (1, 2, False), (1, 4, False), (1, 5, True),
                    (2, 2, False)]


# -- best model and early stopping ---------------------------------------------------------------------------
@pytest.mark.requires("transformers")
@pytest.mark.parametrize("greater", [False, True])
def test_best_model_and_early_stopping_equal_trainer(greater):
    from transformers import EarlyStoppingCallback, Trainer
    from transformers.trainer_callback import TrainerControl, TrainerState

    draw = random.Random(int(greater))
    for _ in range(30):
        patience, threshold = draw.randint(1, 3), draw.choice([0.0, 0.05, 0.2])
        values = [round(draw.uniform(0, 1), 2) for _ in range(draw.randint(1, 12))]
        args = SimpleNamespace(metric_for_best_model="loss", greater_is_better=greater, save_strategy="steps",
                               load_best_model_at_end=True, eval_strategy="steps")
        trainer = SimpleNamespace(args=args, state=TrainerState(), control=TrainerControl())
        callback = EarlyStoppingCallback(patience, threshold)
        selection = ModelSelection("loss", greater, patience, threshold)
        mine = TrainState()
        for step, value in enumerate(values, start=1):
            trainer.state.global_step = mine.step = step
            callback.on_evaluate(args, trainer.state, trainer.control, {"eval_loss": value})
            Trainer._determine_best_metric(trainer, {"eval_loss": value}, None)
            selection.after_evaluation(mine, {"loss": value})
            theirs = trainer.state
            assert (mine.best_metric, mine.best_step) == (theirs.best_metric, theirs.best_global_step)
            assert mine.evals_without_improvement == callback.early_stopping_patience_counter
            assert selection.should_stop(mine) == trainer.control.should_training_stop
            if selection.should_stop(mine):
                break


@pytest.mark.requires("transformers")
def test_pruning_keeps_the_best_checkpoint_as_rotate_checkpoints(tmp_path):
    from transformers.trainer_utils import rotate_checkpoints

    from minift.checkpoint import MANIFEST, prune_checkpoints

    def make(root, steps):
        for step in steps:
            folder = root / f"checkpoint-{step}"
            folder.mkdir(parents=True)
            files = {}
            for name in ("config.json", "model.safetensors", "training_state.pt"):
                (folder / name).write_text(name)
                import hashlib
                files[name] = {"bytes": len(name), "sha256": hashlib.sha256(name.encode()).hexdigest()}
            (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}))

    cases = random.Random(2)
    for case in range(25):
        steps = sorted(cases.sample(range(1, 40), cases.randint(1, 7)))
        keep, best = cases.randint(1, 4), cases.choice([None, *steps])
        ours, theirs = tmp_path / f"m{case}", tmp_path / f"t{case}"
        make(ours, steps)
        make(theirs, steps)
        name = None if best is None else f"checkpoint-{best}"
        prune_checkpoints(ours, keep, log=lambda *_: None, protect=None if name is None else ours / name)
        rotate_checkpoints(str(theirs), keep, None if name is None else str(theirs / name))
        left = [sorted(p.name for p in root.glob("checkpoint-*")) for root in (ours, theirs)]
        assert left[0] == left[1], (steps, keep, best)


# -- settings ----------------------------------------------------------------------------------------
@pytest.mark.requires("transformers")
@pytest.mark.parametrize("name", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_compat_schedules_take_trainers_names(name):
    from transformers import get_scheduler

    from minift.optim import make_scheduler, warmup_steps_for

    cfg = from_dict({"train": {"compat": "trainer", "schedule": name, "warmup_steps": 3}})
    total = 10
    rates = []
    for build in ("theirs", "mine"):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        if build == "theirs":
            scheduler = get_scheduler(name, optimizer, num_warmup_steps=3, num_training_steps=total)
        else:
            t = cfg.train
            scheduler = make_scheduler(optimizer, t.schedule, total, warmup_steps_for(total, t.warmup_steps,
                                                                                     t.warmup_ratio))
        lrs = []
        for _ in range(total):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        rates.append(lrs)
    assert rates[0] == pytest.approx(rates[1], abs=1e-15)


def test_feature_settings_are_checked():
    with pytest.raises(RunConfigError, match="eval_strategy and save_strategy"):
        from_dict({"train": {"eval_strategy": "best"}})
    with pytest.raises(RunConfigError, match="needs evaluations during training"):
        from_dict({"train": {"early_stopping_patience": 2}})
    with pytest.raises(RunConfigError, match="same cadence"):
        from_dict({"train": {"load_best_model_at_end": True, "eval_strategy": "epoch"}})
    with pytest.raises(RunConfigError, match="multiple of"):
        from_dict({"train": {"load_best_model_at_end": True, "eval_every": 4, "checkpoint_every": 6}})
    with pytest.raises(RunConfigError, match="Trainer's names"):
        from_dict({"train": {"compat": "trainer", "schedule": "polynomial"}})
    compat = from_dict({"train": {"compat": "trainer", "eval_strategy": "steps", "log_every": 7}})
    t = compat.train
    assert (t.eval_every, t.save_strategy, t.checkpoint_every) == (7, "steps", 500)
    best = {"load_best_model_at_end": True, "eval_every": 2, "checkpoint_every": 4}
    selection = ModelSelection.from_config(from_dict({"train": best}))
    assert (selection.metric, selection.greater_is_better) == ("loss", False)
    with pytest.raises(RunConfigError, match="the evaluation gives"):
        selection.value({"accuracy": 0.5})


def test_data_seed_orders_the_data_and_trainers_eval_batches():
    from minift.components import build_sampler

    examples = SimpleNamespace(lengths=[random.Random(1).randint(2, 40) for _ in range(50)])
    cfg = load_config(None, ["train.compat=trainer", "train.data_seed=77", "train.batch_size=5"])
    order = [i for batch in build_sampler(cfg, examples).batches(1) for i in batch]
    assert order == torch.randperm(50, generator=torch.Generator().manual_seed(77 + 1)).tolist()
    own = load_config(None, ["train.data_seed=77", "data.sampler=random"])
    other = load_config(None, ["train.data_seed=78", "data.sampler=random"])
    ours = build_sampler(own, examples).batches(0)
    assert ours == make_sampler("random", examples.lengths, 8, 77).batches(0)
    assert ours != build_sampler(other, examples).batches(0)
    lengths = examples.lengths
    assert trainer_eval_batches(lengths, 8, 77, True) != trainer_eval_batches(lengths, 8, 42, True)


def test_logging_first_step_writes_step_one_and_its_window(tmp_path):
    from minift.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, 7, progress=False, log_every=3, window_mean=True, first_step=True)
    losses = [5.0, 4.0, 6.0, 1.0, 2.0, 9.0, 7.0]
    for step, loss in enumerate(losses, start=1):
        logger({"step": step, "loss": loss, "lr": 0.1})
    logger.close()
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in written] == [1, 3, 6]
    assert [r["loss"] for r in written] == [5.0, 5.0, 4.0]  # step 1; steps 2-3; steps 4-6


# -- the whole run beside Trainer: one row per feature ---------------------------------------------------
def _side_by_side():
    import trainer_side_by_side

    return trainer_side_by_side


def _assert_row_matches(name, r, tolerance=1e-5):
    assert r["steps"][0] == r["steps"][1], (name, r)
    assert r["logged_steps"][0] == r["logged_steps"][1] and r["logged_steps"][0], (name, r)
    assert r["eval_steps"][0] == r["eval_steps"][1], (name, r)
    assert r["best_step"][0] == r["best_step"][1], (name, r)
    assert not r["checkpoints"][0] or r["checkpoints"][0] == r["checkpoints"][1], (name, r)
    assert r["loss"] <= 1e-4 and r["lr"] <= 1e-12 and r["eval_loss"] <= 1e-4, (name, r)
    assert r["train_loss"] <= 1e-5 and r["weights"] <= tolerance and r["weight_tensors"] >= 26, (name, r)


@pytest.mark.slow
@pytest.mark.requires("transformers")
@pytest.mark.parametrize("name", ["label_smoothing", "eval+save per steps", "best model, per epoch",
                                  "early stopping", "train_loss", "logging_first_step", "data_seed",
                                  "data_seed, group_by_length", "neftune", "schedule constant",
                                  "schedule constant_with_warmup"])
def test_feature_side_by_side_with_trainer(name):
    shared_path("fixtures", "tiny-openai-gpt")
    sbs = _side_by_side()
    args = sbs.parse_args(["--sampling"])
    r = sbs.compare_feature(args, sbs.features(args)[name])
    _assert_row_matches(name, r)
    if name == "best model, per epoch":  # an early checkpoint is the best, kept from pruning and loaded
        assert r["best_step"][1] < r["steps"][1] and f"checkpoint-{r['best_step'][1]}" in r["checkpoints"][1]
    if name == "early stopping":
        assert r["steps"][1] < 15  # 3 epochs of 5 steps: stopped before the end
    if name == "logging_first_step":
        assert r["logged_steps"][1][0] == 1


@pytest.mark.slow
@pytest.mark.requires("transformers")
def test_features_side_by_side_on_settings_drawn_at_random():
    """Four rows again, on settings no other test uses: rows and settings drawn anew each run (printed
    on failure); every row runs on the fixed settings above."""
    shared_path("fixtures", "tiny-openai-gpt")
    sbs = _side_by_side()
    draw = random.Random(os.urandom(8))
    drawn = {"--seed": draw.randint(0, 10_000), "--epochs": draw.choice([2, 3]),
             "--eval-every": draw.randint(1, 3),
             "--label-smoothing": round(draw.uniform(0.01, 0.4), 3), "--patience": draw.randint(1, 3),
             "--threshold": draw.choice([0.0, 0.02, 0.08]), "--data-seed": draw.randint(0, 10_000),
             "--neftune-alpha": round(draw.uniform(0.5, 15), 2), "--log-every": draw.randint(1, 3),
             "--warmup": draw.randint(0, 3)}
    argv = ["--sampling", *(str(x) for pair in drawn.items() for x in pair)]
    args = sbs.parse_args(argv)
    rows = sbs.features(args)
    for name in draw.sample(sorted(rows), 4):
        feature = rows[name]
        # weights within 2e-4 (a fifth of one AdamW step at lr 1e-3): on drawn settings an element whose
        # gradient is float32 noise on both sides may step the other way (seen: 5.9e-5); the losses, lr
        # and evaluations are held to the fixed rows' bounds
        _assert_row_matches(f"{name} {argv}", sbs.compare_feature(args, feature), tolerance=2e-4)


# -- exact resume with the new state -------------------------------------------------------------------
def _weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("compat", [False, True])
def test_resume_with_best_model_early_stopping_and_neftune_is_bit_identical(tmp_path, monkeypatch, compat):
    """Crash mid-run, resume: the same weights, best checkpoint, early stop and noise as one run."""
    from helpers import run_until_crash

    from minift.finetune import run

    overrides = ["train.eval_strategy=epoch", "train.save_strategy=epoch",
                 "train.load_best_model_at_end=true", "train.metric_for_best_model=loss",
                 "train.greater_is_better=yes",
                 "train.early_stopping_patience=2", "train.neftune_noise_alpha=5.0", "train.max_steps=0",
                 "train.epochs=5", "data.max_train_examples=64", "train.keep_checkpoints=1",
                 *(["train.compat=trainer", "train.seed=0", "train.grad_accum=2", "train.log_every=1",
                    "eval.batch_size=32", "train.checkpoint_every=0"] if compat else [])]
    full = run(tiny_config(tmp_path / "full", *overrides), log=lambda *_: None)
    run_until_crash(tiny_config(tmp_path / "resumed", *overrides), 6, monkeypatch)  # 4 steps per epoch
    resumed = run(tiny_config(tmp_path / "resumed", *overrides), resume=True, log=lambda *_: None)
    assert full["steps"] == resumed["steps"] == 12
    assert full.get("early_stopped") and resumed.get("early_stopped")
    assert full["best_model"] == resumed["best_model"] and full["best_model"]["checkpoint_step"] == 4
    for name in ("model", "checkpoint-4", "checkpoint-12"):
        a, b = _weights(tmp_path / "full" / name), _weights(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert all(torch.equal(a, b) for a, b in zip(_weights(tmp_path / "full" / "model").values(),
                                                 _weights(tmp_path / "full" / "checkpoint-4").values()))


def test_label_smoothing_run_logs_the_plain_cross_entropy_beside_it(tmp_path):
    """minift's own mode: the step's loss is smoothed, ``nll`` is the plain CE over the same count, and
    the eval loss stays the plain CE (exp of it the perplexity)."""
    from minift.finetune import run

    run(tiny_config(tmp_path, "train.label_smoothing=0.2", "train.max_steps=2", "data.max_train_examples=32",
                    "eval.max_examples=16", "eval.accuracy=false"), log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time" in r]
    assert len(steps) == 2 and all(r["loss"] > 0.8 * r["nll"] and r["loss"] != r["nll"] for r in steps)
    evaluation = [r["eval"] for r in records if "eval" in r][-1]
    assert evaluation["loss"] == pytest.approx(math.log(evaluation["perplexity"]), rel=1e-9)
