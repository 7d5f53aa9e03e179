"""The static path: packed rows of a fixed shape (sampling.PackedSampler + PackingCollator with
rows_per_batch), per-document attention and loss in float64, and torch.compile over an epoch."""
from __future__ import annotations

import pytest
import torch

from minift.collate import Collator, PackingCollator, model_inputs
from minift.models import GPT2Config, GPTConfig, build_model
from minift.sampling import PackedSampler

P = 0  # pad id


def _examples(n: int, seed: int = 0, longest: int = 14) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, longest + 1, (n,), generator=g).tolist()
    return [{"input_ids": torch.randint(1, 90, (k,), generator=g).tolist(), "prompt_length": k // 2}
            for k in lengths]


def test_packed_sampler_fills_fixed_rows_and_covers_the_epoch_once():
    examples = _examples(101)
    lengths = [len(e["input_ids"]) for e in examples]
    sampler = PackedSampler(lengths, batch_size=3, seed=4, row_length=16)
    collate = PackingCollator(pad_id=P, row_length=16, rows_per_batch=3)
    batches = sampler.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(101))
    for index in batches:
        batch = collate([examples[i] for i in index])
        assert batch["input_ids"].shape == (3, 16)  # the last batch too
        assert batch["n_real_tokens"] == sum(lengths[i] for i in index)
    # a batch closes only when its next example fits none of its full set of rows
    for index, following in zip(batches, batches[1:]):
        rows = [0, 0, 0]
        for i in index:
            rows[next(r for r in range(3) if rows[r] + lengths[i] <= 16)] += lengths[i]
        assert all(used + lengths[following[0]] > 16 for used in rows)
    assert sampler.batches(1) != batches  # a new order every epoch


def test_fixed_rows_refuse_a_batch_that_does_not_fit():
    three_full_rows = [{"input_ids": [5] * 8}] * 3
    with pytest.raises(ValueError, match="3 examples need 3 packed rows of 8 tokens; the batch has 2"):
        PackingCollator(pad_id=P, row_length=8, rows_per_batch=2)(three_full_rows)
    with pytest.raises(ValueError, match="does not fit a packed row of 4"):
        PackedSampler([3, 5], batch_size=2, row_length=4)


@pytest.mark.parametrize("config_cls", [GPTConfig, GPT2Config])
def test_packed_rows_equal_each_document_alone_float64(config_cls):
    """Per-document logits and summed loss equal the unpacked ones; positions restart per document."""
    torch.manual_seed(0)
    model = build_model(config_cls(vocab_size=97, n_positions=16, n_embd=16, n_layer=2,
                                   n_head=2)).double().eval()
    examples = _examples(7, seed=1)
    packed = PackingCollator(pad_id=P, row_length=16, rows_per_batch=6, objective="completion")(examples)
    doc_starts = (packed["position_ids"] == 0) & (packed["document_ids"] >= 0)
    assert int(doc_starts.sum()) == len(examples)  # positions restart at every document
    with torch.no_grad():
        logits = model(packed["input_ids"], position_ids=packed["position_ids"],
                       document_ids=packed["document_ids"])
        packed_out = model(**model_inputs(packed, "cpu"))
        alone_sum = 0.0
        for r in range(packed["input_ids"].shape[0]):
            for doc in packed["document_ids"][r].unique().tolist():
                if doc < 0:
                    continue
                cols = (packed["document_ids"][r] == doc).nonzero()[:, 0]
                ids = packed["input_ids"][r, cols]
                assert packed["position_ids"][r, cols].tolist() == list(range(len(cols)))
                torch.testing.assert_close(logits[r, cols], model(ids[None])[0], rtol=0, atol=1e-12)
                example = next(e for e in examples if e["input_ids"] == ids.tolist())
                single = Collator(pad_id=P, objective="completion")([example])
                alone_sum += model(**model_inputs(single, "cpu")).loss_sum.item()
    assert packed_out.n_loss_targets == packed["n_loss_targets"]
    assert packed_out.loss_sum.item() == pytest.approx(alone_sum, rel=1e-12)


def test_no_attention_across_documents():
    """Changing one document's tokens leaves every other document's logits exactly unchanged."""
    torch.manual_seed(0)
    model = build_model(GPT2Config(vocab_size=97, n_positions=16, n_embd=16, n_layer=2,
                                   n_head=2)).double().eval()
    examples = _examples(5, seed=2, longest=6)
    batch = PackingCollator(pad_id=P, row_length=16, rows_per_batch=2)(examples)
    docs = batch["document_ids"]
    target = docs[0] == 1
    changed = batch["input_ids"].clone()
    changed[0, target] = (changed[0, target] + 7) % 90 + 1
    with torch.no_grad():
        before, after = (model(ids, position_ids=batch["position_ids"], document_ids=docs)
                         for ids in (batch["input_ids"], changed))
    assert not torch.equal(before[0, target], after[0, target])
    others = torch.ones_like(docs, dtype=torch.bool)
    others[0] = ~target
    assert torch.equal(before[others], after[others])


def _compiled_epoch(loss_rows: str, fused_head: bool, backend: str = "aot_eager") -> tuple[dict, int]:
    """One epoch of the packed static path through loop.train with the model compiled; returns
    dynamo's counters (graph breaks, graphs) and the steps run."""
    from torch._dynamo.utils import counters
    from torch.utils.data import DataLoader

    from minift.loop import train
    from minift.optim import make_adamw, make_scheduler

    examples = _examples(60, seed=3)
    sampler = PackedSampler([len(e["input_ids"]) for e in examples], batch_size=2, seed=0, row_length=16)
    loader = DataLoader(examples, batch_sampler=sampler,
                        collate_fn=PackingCollator(pad_id=P, row_length=16, rows_per_batch=2))
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=97, n_positions=16, n_embd=16, n_layer=2,
                                  n_head=2)).pad_vocab(64)
    model.set_hot_path(loss_rows=loss_rows, fused_head=fused_head)
    optimizer = make_adamw(model, 1e-3, 0.0, (0.9, 0.999), 1e-8, "no")
    steps = len(sampler)
    torch._dynamo.reset()
    counters.clear()
    train(torch.compile(model, backend=backend), optimizer, make_scheduler(optimizer, "constant", steps, 0),
          loader, total_steps=steps)
    return {k: dict(v) for k, v in counters.items()}, steps


@pytest.mark.slow  # torch.compile over an epoch: tens of seconds on a busy CPU
@pytest.mark.parametrize("fused_head", [True, False], ids=["fused-head", "plain-head"])
def test_compile_holds_over_an_epoch_of_the_static_path(fused_head):
    """0 graph breaks and one graph for every step of the epoch (the last, part-empty batch too).
    aot_eager: the graphs dynamo captures are the same under inductor (the slow test runs that)."""
    stats, steps = _compiled_epoch("all", fused_head)
    assert steps > 10
    assert not stats.get("graph_break"), stats["graph_break"]
    assert stats["stats"]["unique_graphs"] == 1
    assert not stats.get("recompiles")


@pytest.mark.slow
def test_label_gathering_breaks_the_graph():
    """The contrast that shows the counters see breaks: gathering labelled rows is a
    data-dependent shape."""
    stats, _ = _compiled_epoch("labelled", False)
    assert stats.get("graph_break") or stats["stats"]["unique_graphs"] > 1


def _recipe(tmp_path, *overrides):
    from minift.config import load_config
    from minift.finetune import run

    from conftest import REPO

    cfg = load_config(REPO / "configs" / "offline-default.toml", [
        f'train.output_dir="{tmp_path}"', "train.progress=false", "train.plot=false", "eval.max_examples=64",
        "eval.before_training=false", "data.sampler=packed", "train.batch_size=4", "train.grad_accum=1",
        *overrides])
    return cfg, run(cfg, log=lambda *_: None)


def test_recipe_static_path_trains_and_exports_the_true_vocabulary(tmp_path):
    """data.sampler = "packed": every step [4 x 64]; the padded vocabulary stays out of the export."""
    import json

    import minift

    cfg, summary = _recipe(tmp_path, "train.max_steps=3")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time" in r]
    assert len(steps) == 3 and all(r["padded_tokens"] == 4 * cfg.data.max_length for r in steps)
    exported = minift.from_pretrained(tmp_path / "model")
    saved_vocab = json.loads((tmp_path / "model" / "config.json").read_text())["vocab_size"]
    assert exported.token_embedding.weight.shape[0] == exported.config.vocab_size == saved_vocab
    from minift.finetune import build_model as recipe_model
    from minift.finetune import build_tokenizer

    trained_shape = recipe_model(cfg, build_tokenizer(cfg), torch.device("cpu"))
    assert trained_shape.token_embedding.weight.shape[0] == -(-saved_vocab // 64) * 64 > saved_vocab


@pytest.mark.slow
def test_recipe_compile_holds_over_an_epoch(tmp_path):
    """model.compile = true with the default backend over a whole epoch of the packed recipe."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _recipe(tmp_path, "model.compile=true", "data.max_train_examples=200", "train.epochs=1")
    assert not counters.get("graph_break"), dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2  # training graph; eval (no grad) may add one


@pytest.mark.slow
def test_the_gpu_recipe_runs_on_cpu_with_compile_holding(tmp_path):
    """configs/openai-gpt-tweets-gpu.toml as shipped, moved to CPU and fp32 the way its header says (a tiny
    random model on the project's synthetic data stands in for the hub checkpoint and tweets): it trains,
    and torch.compile captures the static path without a graph break."""
    from torch._dynamo.utils import counters

    from minift.config import load_config
    from minift.finetune import run

    from conftest import REPO

    torch._dynamo.reset()
    counters.clear()
    cfg = load_config(REPO / "configs" / "openai-gpt-tweets-gpu.toml", [
        "train.device=cpu", "train.precision=fp32", "model.name=random", "model.tokenizer=synthetic",
        "model.config.n_positions=64", "model.config.n_embd=32", "model.config.n_layer=1",
        "model.config.n_head=2", "data.source=synthetic", "data.max_length=64", "data.num_workers=0",
        "train.batch_size=4", "train.max_steps=6", "train.log_every=3", f'train.output_dir="{tmp_path}"',
        "train.progress=false", "train.plot=false", "eval.max_examples=32"])
    summary = run(cfg, log=lambda *_: None)
    assert summary["steps"] == 6 and summary["last_loss"] < summary["first_loss"]
    assert not counters.get("graph_break"), dict(counters["graph_break"])
