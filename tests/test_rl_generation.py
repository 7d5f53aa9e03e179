"""Generation inside the RL step (minift.rl.generation) and the prompts it starts from (minift.rl.prompts),
against independent references: transformers' logits processors and ``generate`` (same seed, left
padding), the same prompt generated alone, a full forward without cache, TRL's ``RepeatSampler``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from minift.data import DataError
from minift.errors import InputError
from minift.models import GPT2Config, GPTConfig, build_model
from minift.rl.generation import (
    SamplingSettings,
    completion_mask,
    decode_completions,
    generate_completions,
    new_generator,
    next_token_scores,
)
from minift.rl.prompts import (
    PromptSampler,
    load_prompt_dataset,
    max_prompt_tokens,
    prompts_per_generation,
    tokenize_prompts,
    tweet_prompts,
)

from conftest import REPO, SHARED, shared_path

PROMPTS = [[5, 17, 3, 42, 8, 9, 30], [11], [7, 7, 2, 40], [21, 22, 23, 24, 25, 26, 27, 28, 29, 31]]


def tiny_model(config_cls=GPT2Config, vocab=48, seed=0, **overrides):
    torch.manual_seed(seed)
    settings = {"vocab_size": vocab, "n_positions": 48, "n_embd": 32, "n_layer": 2, "n_head": 4,
                "initializer_range": 0.3, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return build_model(config_cls(**{**settings, **overrides})).eval()


def left_padded(prompts, pad_id):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, width


# -- the KV cache with left padding (models/) -------------------------------------------------------------
@pytest.mark.parametrize("config_cls", [GPTConfig, GPT2Config])
def test_left_padded_cached_forward_equals_each_row_alone(config_cls):
    """Prefill of a left-padded batch + tokens through the cache: every real position's hidden state is
    the unpadded row's own full forward (positions from the mask, pads invisible)."""
    model = tiny_model(config_cls)
    ids, mask, width = left_padded(PROMPTS, pad_id=0)
    cache = model.new_kv_cache()
    prefill = model.hidden_states(ids, mask, kv_cache=cache)
    extra = torch.tensor([[3, 4], [5, 6], [7, 8], [9, 10]])
    steps = []
    for t in range(2):
        mask = torch.cat([mask, torch.ones(4, 1, dtype=torch.long)], dim=1)
        steps.append(model.hidden_states(extra[:, t:t + 1], mask, kv_cache=cache))
    batched = torch.cat([prefill] + steps, dim=1)
    for row, prompt in enumerate(PROMPTS):
        alone = model.hidden_states(torch.tensor([prompt + extra[row].tolist()]))[0]
        torch.testing.assert_close(batched[row, width - len(prompt):], alone, rtol=0, atol=2e-5)
    assert torch.isfinite(batched).all()  # pad queries see themselves: no empty softmax row


def test_a_cached_attention_mask_must_cover_cached_and_new_tokens():
    model = tiny_model()
    cache = model.new_kv_cache()
    model.hidden_states(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="covers cached and new tokens"):
        model.hidden_states(torch.tensor([[4]]), torch.ones(1, 1, dtype=torch.long), kv_cache=cache)


# -- the sampling filters --------------------------------------------------------------------------------
@pytest.mark.requires("transformers")
@pytest.mark.parametrize("temperature,top_k,top_p,min_p,penalty", [
    (1.0, 0, 1.0, 0.0, 1.0), (0.7, 5, 1.0, 0.0, 1.0), (1.3, 0, 0.8, 0.0, 1.0), (1.0, 0, 1.0, 0.1, 1.0),
    (0.6, 12, 0.9, 0.05, 1.3), (1.0, 1, 0.5, 0.2, 0.7)])
def test_filters_equal_transformers_logits_processors(temperature, top_k, top_p, min_p, penalty):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    generator = torch.Generator().manual_seed(top_k + int(100 * top_p))
    logits = torch.randn(6, 300, generator=generator) * 3
    input_ids = torch.randint(0, 300, (6, 9), generator=generator)
    processors = LogitsProcessorList()  # transformers' order (GenerationMixin._get_logits_processor)
    if penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty))
    processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        processors.append(TopPLogitsWarper(top_p))
    if min_p:
        processors.append(MinPLogitsWarper(min_p))
    expected = processors(input_ids, logits.clone())
    seen = torch.zeros(6, 300, dtype=torch.bool).scatter_(1, input_ids, True)
    settings = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=penalty)
    ours = next_token_scores(logits.clone(), settings, seen)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert (~torch.isinf(ours)).sum(dim=1).min() >= 1
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


# -- generation against transformers' generate ------------------------------------------------------------
def save_transformers_gpt2(directory, vocab=16):
    """A tiny transformers GPT-2 whose EOS (id 3) is sampled often, so rows stop at different steps."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = HFConfig(vocab_size=vocab, n_positions=48, n_embd=16, n_layer=2, n_head=2, initializer_range=0.5,
                      bos_token_id=1, eos_token_id=3, pad_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    return model


def transformers_completions(model, prompts, pad_id, seed, **kwargs):
    ids, mask, width = left_padded(prompts, pad_id)
    torch.manual_seed(seed)  # transformers samples from the global generator
    return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_id, **kwargs)[:, width:]


@pytest.mark.requires("transformers")
@pytest.mark.parametrize("do_sample,max_new,eos_ids,seed,rows", [
    (True, 30, [3], 11, 8), (False, 30, [3], 11, 8), (True, 30, [3, 5], 30, 4)])
def test_sampled_completions_equal_transformers_generate(tmp_path, do_sample, max_new, eos_ids, seed, rows):
    """Same seed, same left-padded batch: the very tokens transformers draws, pads after each row's EOS,
    the mask up to and including the first EOS, truncated = no EOS (nor pad) at the end; the loop stops
    when every row has finished."""
    from minift.hub import from_pretrained

    hf = save_transformers_gpt2(tmp_path)
    model = from_pretrained(tmp_path)
    prompts = ([[1, 2, 4, 5, 6, 7], [8], [9, 10, 11], [12, 13, 14, 15, 1, 2, 4, 5]] * 2)[:rows]
    settings = SamplingSettings(max_completion_length=max_new, do_sample=do_sample)
    ours = generate_completions(model, prompts, settings, eos_ids=eos_ids, pad_id=0,
                                generator=new_generator(seed))
    theirs = transformers_completions(hf, prompts, 0, seed, max_new_tokens=max_new, do_sample=do_sample,
                                      eos_token_id=eos_ids, top_k=0)
    assert torch.equal(ours.ids, theirs)
    for row, tokens in enumerate(theirs.tolist()):
        n = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
        assert ours.completion_ids[row] == tokens[:n]
        assert ours.mask[row].tolist() == [1] * n + [0] * (len(tokens) - n)
        assert bool(ours.is_truncated[row]) == (tokens[n - 1] not in eos_ids + [0])
    if do_sample and eos_ids == [3] and max_new == 30:  # rows end at different steps, some never
        assert len(set(ours.lengths.tolist())) > 2 and 0 < int(ours.is_truncated.sum()) < rows
    if len(eos_ids) == 2:  # every row met an EOS before max_new: generation stopped early
        assert ours.ids.shape[1] < max_new and not ours.is_truncated.any()


@pytest.mark.shared
@pytest.mark.requires("transformers")
@pytest.mark.parametrize("fixture,pad_id", [("tiny-gpt2", 50256), ("tiny-openai-gpt", 40478)])
def test_filtered_sampling_equals_transformers_on_the_fixtures(fixture, pad_id):
    """Temperature, top_k, top_p, min_p and the repetition penalty together, on left-padded tweets."""
    from transformers import AutoModelForCausalLM

    from minift.hub import from_pretrained
    from minift.tokenizer import load_tokenizer

    folder = shared_path("fixtures", fixture)
    tokenizer = load_tokenizer(folder)
    prompts = [tokenizer.encode(t) for t in ("i love this day so much sentiment:", "bad sentiment:",
                                             "what is going on here with all of it sentiment:")]
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    filters = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.01, "repetition_penalty": 1.2}
    ours = generate_completions(from_pretrained(folder), prompts, SamplingSettings(max_completion_length=12,
                                **filters), eos_ids=[pad_id], pad_id=pad_id, generator=new_generator(3))
    theirs = transformers_completions(hf, prompts, pad_id, 3, max_new_tokens=12, do_sample=True,
                                      eos_token_id=pad_id, **filters)
    assert torch.equal(ours.ids, theirs)


# -- padding, chunks, resume ------------------------------------------------------------------------------
@pytest.mark.parametrize("config_cls", [GPTConfig, GPT2Config])
def test_padding_never_changes_a_prompts_completion(config_cls):
    """A short prompt batched with longer ones (left padding) gets the greedy tokens and log-probs it gets
    alone, and those log-probs are a full forward's over prompt + completion (no cache)."""
    model = tiny_model(config_cls)
    settings = SamplingSettings(max_completion_length=12, do_sample=False)
    batched = generate_completions(model, PROMPTS, settings, eos_ids=[47], pad_id=0)
    for row, prompt in enumerate(PROMPTS):
        alone = generate_completions(model, [prompt], settings, eos_ids=[47], pad_id=0)
        assert batched.completion_ids[row] == alone.completion_ids[0]
        n = len(alone.completion_ids[0])
        torch.testing.assert_close(batched.logprobs[row, :n], alone.logprobs[0, :n], rtol=0, atol=1e-5)
        full = torch.tensor([prompt + alone.completion_ids[0]])
        logp = torch.log_softmax(model(full)[0].double(), dim=-1)
        expected = logp[len(prompt) - 1:-1].gather(1, full[0, len(prompt):, None])[:, 0]
        torch.testing.assert_close(alone.logprobs[0, :n].double(), expected, rtol=0, atol=1e-5)
    assert len({len(c) for c in batched.completion_ids}) == 1  # no EOS id 47 drawn greedily here: all 12


def test_temperature_scales_the_recorded_log_probs():
    model = tiny_model()
    settings = SamplingSettings(max_completion_length=6, temperature=0.5)
    out = generate_completions(model, PROMPTS[:1], settings, eos_ids=[47], pad_id=0,
                               generator=new_generator(0))
    full = torch.tensor([PROMPTS[0] + out.completion_ids[0]])
    logp = torch.log_softmax(model(full)[0].double() / 0.5, dim=-1)
    expected = logp[len(PROMPTS[0]) - 1:-1].gather(1, full[0, len(PROMPTS[0]):, None])[:, 0]
    torch.testing.assert_close(out.logprobs[0].double(), expected, rtol=0, atol=1e-5)


def test_a_saved_generator_state_draws_the_same_completions_again():
    """Round 1, save the generator's state, round 2; restoring the state redraws round 2 exactly, and
    chunking (generation_batch_size rows per forward) changes nothing greedy."""
    model = tiny_model(vocab=12)  # EOS id 3 of 12: rows stop at different steps
    settings = SamplingSettings(max_completion_length=10, top_k=6, temperature=0.9)
    generator, prompts = new_generator(7), [[1, 2, 4, 5], [6]] * 2
    generate_completions(model, prompts, settings, eos_ids=[3], pad_id=0, generator=generator)
    state = generator.get_state()
    second = generate_completions(model, prompts, settings, eos_ids=[3], pad_id=0, generator=generator)
    resumed = new_generator(123)
    resumed.set_state(state)
    again = generate_completions(model, prompts, settings, eos_ids=[3], pad_id=0, generator=resumed)
    assert torch.equal(second.ids, again.ids) and torch.equal(generator.get_state(), resumed.get_state())
    greedy = SamplingSettings(max_completion_length=10, do_sample=False)
    prompts = [[1, 2], [4, 5, 6, 7, 8, 9], [10], [11, 4, 2]]
    whole = generate_completions(model, prompts, greedy, eos_ids=[3], pad_id=0)
    chunked = generate_completions(model, prompts, greedy, eos_ids=[3], pad_id=0, batch_size=3)
    assert whole.completion_ids == chunked.completion_ids and torch.equal(whole.mask, chunked.mask)


@pytest.mark.shared
def test_completions_decode_without_special_tokens():
    from minift.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(shared_path("tokenizers", "gpt2"))
    ids = [tokenizer.encode(" positive") + [tokenizer.eos_id], tokenizer.encode(" so so")]
    assert decode_completions(tokenizer, ids) == [" positive", " so so"]


def test_completion_mask_ends_at_the_first_eos():
    tokens = torch.tensor([[4, 3, 5, 3], [4, 4, 4, 4], [3, 0, 0, 0]])
    assert completion_mask(tokens, [3]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert completion_mask(tokens, [5, 4]).tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_generation_refuses_bad_settings_and_prompts_in_one_line():
    model = tiny_model()
    cases = [(SamplingSettings(temperature=0.0), "temperature must be a finite number > 0"),
             (SamplingSettings(top_p=0.0), "top_p must be in"),
             (SamplingSettings(top_k=-1), "top_k must be >= 0"),
             (SamplingSettings(min_p=2.0), "min_p must be in"),
             (SamplingSettings(max_completion_length=0), "max_completion_length must be >= 1")]
    for settings, message in cases:
        with pytest.raises(InputError, match=message):
            generate_completions(model, [[1, 2]], settings, eos_ids=[3], pad_id=0)
    with pytest.raises(InputError, match="prompt 1 has 40 tokens; with max_completion_length 10 that passes"):
        generate_completions(model, [[1], [2] * 40], SamplingSettings(max_completion_length=10), [3], 0)
    with pytest.raises(InputError, match="prompt 0 has no tokens"):
        generate_completions(model, [[]], SamplingSettings(max_completion_length=4), [3], 0)


# -- prompts ----------------------------------------------------------------------------------------------
class WordTokenizer:
    """One id per word (by a fixed table), enough to count prompt tokens by hand."""

    def encode(self, text):
        return [len(word) for word in text.split()]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def test_tweet_prompts_keep_the_gold_label_and_skip_empty_texts():
    split = datasets.Dataset.from_dict({"text": ["  great day ", "", "awful"],
                                        "label_text": ["positive", "neutral", "negative"]})
    prompts = tweet_prompts(split, "train", "{text} sentiment: {label}", ["negative", "neutral", "positive"])
    assert prompts.to_dict() == {"prompt": ["great day sentiment:", "awful sentiment:"],
                                 "label": ["positive", "negative"], "row": [0, 2]}
    with pytest.raises(DataError, match="row 1: unknown label 'mixed'"):
        tweet_prompts(datasets.Dataset.from_dict({"text": ["a", "b"], "label_text": ["positive", "mixed"]}),
                      "train", "{text} sentiment: {label}", ["negative", "neutral", "positive"])


def test_prompt_dataset_from_a_file_or_folder_drops_prompts_too_long_and_counts_them(tmp_path):
    rows = [{"prompt": "a b c", "answer": "x"}, {"prompt": "a b c d e f g", "answer": "y"},
            {"prompt": "a", "answer": "z"}, {"prompt": "   ", "answer": "w"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "parquet").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    for source in (tmp_path / "train.jsonl", tmp_path, tmp_path / "parquet"):
        dataset = load_prompt_dataset(str(source))
        prompts, report = tokenize_prompts(dataset, WordTokenizer(), max_tokens=max_prompt_tokens(10, 5))
        assert prompts.prompts == ["a b c", "a"] and prompts.columns == {"answer": ["x", "z"]}
        assert report.dropped_rows == [1, 3] and report.prompts == 2
        assert "2 dropped (rows 1, 3)" in report.line()
    batch = prompts.select([1, 1, 0])
    assert batch.prompt_ids == [[1], [1], [1, 1, 1]] and batch.columns == {"answer": ["z", "z", "x"]}
    with pytest.raises(DataError, match="no prompt left"):
        tokenize_prompts(dataset, WordTokenizer(), max_tokens=0)
    with pytest.raises(InputError, match="leaves no room for a prompt"):
        max_prompt_tokens(64, 64)


def test_prompt_dataset_refusals_are_one_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"question": "hi"}\n')
    with pytest.raises(DataError, match="no 'prompt' column .*columns are \\['question'\\]"):
        load_prompt_dataset(str(tmp_path / "a.jsonl"))
    (tmp_path / "b.jsonl").write_text('{"prompt": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match="row 0: 'prompt' must be plain text, got list"):
        load_prompt_dataset(str(tmp_path / "b.jsonl"))


# -- the prompt sampler --------------------------------------------------------------------------------------
def test_prompt_sampler_groups_epochs_ranks_and_resume():
    sampler = PromptSampler(n_prompts=10, num_generations=3, prompts_per_generation=4, seed=5)
    assert len(sampler) == 2  # 10 // 4: the incomplete last batch is left out
    batches = [sampler.next_batch() for _ in range(5)]
    for batch in batches:
        assert len(batch) == 12 and all(batch[i] == batch[i - i % 3] for i in range(12))
    assert len(set(batches[0] + batches[1])) == 8  # one epoch: distinct prompts
    assert batches[0][::3] + batches[1][::3] != batches[2][::3] + batches[3][::3]  # a new permutation
    resumed = PromptSampler(10, 3, 4, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(PromptSampler(10, 3, 4, seed=5).state_dict())))
    copy = PromptSampler(10, 3, 4, seed=5)
    copy.next_batch(), copy.next_batch(), copy.next_batch()
    resumed.load_state_dict(copy.state_dict())
    assert [resumed.next_batch() for _ in range(2)] == batches[3:5]
    ranks = [PromptSampler(10, 3, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].next_batch() + ranks[1].next_batch() == batches[0]
    with pytest.raises(InputError, match="resume with the same prompts"):
        PromptSampler(10, 3, 4, seed=6).load_state_dict(copy.state_dict())
    assert prompts_per_generation(12, 3) == 4
    for size, group in ((10, 3), (2, 3)):
        with pytest.raises(InputError, match=f"generation_batch_size {size} is not a multiple of num_gen"):
            prompts_per_generation(size, group)
    for kwargs, message in (({"num_generations": 1}, "num_generations must be >= 2"),
                            ({"world_size": 3}, "cannot be split into whole groups over 3 processes"),
                            ({"n_prompts": 3}, "cannot fill one generation batch")):
        with pytest.raises(InputError, match=message):
            PromptSampler(**{"n_prompts": 10, "num_generations": 3, "prompts_per_generation": 4, **kwargs})


# TRL's RepeatSampler order, recorded from TRL; regenerate with
#   PYTHONPATH=.:benchmarks python3 tests/test_rl_generation.py
SAMPLER_TRACE = Path(__file__).parent / "data" / "trl_repeat_sampler.json"
SAMPLER_CASES = [{"n": 11, "num_generations": 4, "prompts_per_generation": 3, "seed": 9, "shuffle": True,
                  "epochs": 3},
                 {"n": 7, "num_generations": 2, "prompts_per_generation": 2, "seed": 0, "shuffle": False,
                  "epochs": 2}]


def trl_repeat_sampler_trace() -> dict:
    """TRL's RepeatSampler (repeat_count 1: one generation round per batch), iterated epoch after epoch
    as the Trainer's DataLoader does (one sampler object, so one generator across epochs)."""
    import trl
    from trl.trainer.utils import RepeatSampler

    cases = []
    for case in SAMPLER_CASES:
        sampler = RepeatSampler(list(range(case["n"])), mini_repeat_count=case["num_generations"],
                                batch_size=case["prompts_per_generation"], repeat_count=1,
                                shuffle=case["shuffle"], seed=case["seed"])
        cases.append({**case, "indices": [i for _ in range(case["epochs"]) for i in sampler]})
    return {"trl_version": trl.__version__, "cases": cases}


def test_prompt_sampler_follows_trls_repeat_sampler_epoch_after_epoch():
    for case in json.loads(SAMPLER_TRACE.read_text())["cases"]:
        ours = PromptSampler(case["n"], case["num_generations"], case["prompts_per_generation"],
                             seed=case["seed"], shuffle=case["shuffle"])
        drawn = [i for _ in range(case["epochs"] * len(ours)) for i in ours.next_batch()]
        assert drawn == case["indices"]


@pytest.mark.slow
@pytest.mark.requires("trl")
def test_the_stored_sampler_trace_is_trls():
    assert trl_repeat_sampler_trace() == json.loads(SAMPLER_TRACE.read_text())


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.requires("transformers")
def test_generation_benchmark_runs_and_both_sides_draw_the_same_tokens(tmp_path):
    shared_path("fixtures", "tiny-gpt2")
    out = tmp_path / "generation.json"
    command = [sys.executable, "benchmarks/generation.py", "--models", "tiny-gpt2", "--batch-size", "3",
               "--max-new-tokens", "4", "--rounds", "1", "--out", str(out)]
    result = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "MINIFT_SHARED": str(SHARED), "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())[0]
    assert record["same_tokens"] and record["new_tokens"] == 4
    assert "| tiny-gpt2 | cpu, fp32 | 3 |" in result.stdout


if __name__ == "__main__":
    SAMPLER_TRACE.write_text(json.dumps(trl_repeat_sampler_trace()) + "\n")
