"""transformers.Trainer on the same model shape and tweets, timed step by step, for the
side-by-side in benchmarks/throughput.py. Only benchmarks import transformers; minift never does.

Two contenders:
- the classic recipe: every tweet padded to 512 tokens, batch 1, gradient accumulation 4;
- Trainer at its best: dynamic padding to a multiple of 8, train_sampling_strategy="group_by_length",
  batch 16, gradient accumulation 2.
The model is transformers' class of the benchmarked shape: ``OpenAIGPTLMHeadModel``, ``GPT2LMHeadModel``
or, with ``--model-type llama``, ``LlamaForCausalLM`` (SDPA attention) of the ``--shape``.
"""
from __future__ import annotations

import tempfile
import time

import torch

from harness import LLAMA_SHAPES, TOKENIZER_OF, Contender, Row, shared_dir, tokenized_tweets


def _transformers_tokenizer(model_type: str):
    import transformers

    # transformers 5.x: build from the folder; the vocab_file=/merges_file= constructor silently
    # builds a 1-token vocabulary.
    cls = (transformers.OpenAIGPTTokenizerFast if model_type == "openai-gpt"
           else transformers.GPT2TokenizerFast)
    tok = cls.from_pretrained(str(shared_dir() / "tokenizers" / TOKENIZER_OF[model_type]))
    if tok.pad_token is None:
        if model_type == "openai-gpt":
            tok.add_special_tokens({"pad_token": "[PAD]"})
        else:
            tok.pad_token = tok.eos_token
    return tok


def _model(model_type: str, vocab_size: int, shape: str | None = None):
    import transformers

    torch.manual_seed(0)
    if model_type == "llama":  # the same Llama shape as minift's rows, transformers' LlamaForCausalLM (SDPA)
        config = transformers.LlamaConfig(vocab_size=vocab_size, **LLAMA_SHAPES[shape])
        return transformers.LlamaForCausalLM(config)
    if model_type == "openai-gpt":
        config = transformers.OpenAIGPTConfig(vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0,
                                              attn_pdrop=0.0)
        return transformers.OpenAIGPTLMHeadModel(config)
    config = transformers.GPT2Config(vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def run_trainer(id_: str, name: str, model_type: str, examples, *, max_length_padding: bool, batch_size: int,
                grad_accum: int, group_by_length: bool, steps: int, warmup: int, output_dir: str,
                precision: str = "fp32", seed: int = 0, compile_model: bool = False,
                shape: str | None = None) -> Row:
    import datasets
    import transformers

    tok = _transformers_tokenizer(model_type)
    ids = examples.input_ids
    if max_length_padding:  # random batches need no big pool: 4096 tweets keep the 512-padded copy small
        ids = ids[:4096]  # tokenize with padding="max_length", as the classic recipe does
        rows = {"input_ids": [x + [tok.pad_token_id] * (512 - len(x)) for x in ids],
                "attention_mask": [[1] * len(x) + [0] * (512 - len(x)) for x in ids]}
    else:
        rows = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
    rows["length"] = [len(x) for x in ids]
    dataset = datasets.Dataset.from_dict(rows)

    inner = transformers.DataCollatorForLanguageModeling(tok, mlm=False,
                                                         pad_to_multiple_of=None if max_length_padding else 8)
    counts: list[tuple[int, int, int, int]] = []

    def collate(features):
        features = [{k: v for k, v in f.items() if k != "length"} for f in features]
        batch = inner(features)
        real = int(batch["attention_mask"].sum())
        counts.append((real, batch["input_ids"].numel(), int((batch["labels"][:, 1:] != -100).sum()),
                       batch["input_ids"].shape[0]))
        return batch

    ends: list[float] = []

    class StepTimes(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    args = transformers.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, max_steps=warmup + steps, learning_rate=5e-5,
        report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), seed=seed, torch_compile=compile_model,
        # workers pay on a GPU, not on 2 CPU cores
        dataloader_num_workers=2 if torch.cuda.is_available() else 0,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        length_column_name="length", remove_unused_columns=False, bf16=precision == "bf16")
    model = _model(model_type, len(tok), shape)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                                   callbacks=[StepTimes()])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    step_times = [b - a for a, b in zip(ends, ends[1:])][warmup:]
    per_step = [counts[s * grad_accum:(s + 1) * grad_accum] for s in range(warmup, warmup + steps)]
    records = [{"step_time": t, "real_tokens": sum(c[0] for c in s), "padded_tokens": sum(c[1] for c in s),
                "loss_tokens": sum(c[2] for c in s), "sequences": sum(c[3] for c in s)}
               for t, s in zip(step_times, per_step)]
    # CPU: a fresh process measures the peak memory instead
    return Row(id_, name, records, peak_memory=torch.cuda.max_memory_allocated() if cuda else None)


BEST = "trainer-best"  # the baseline every ratio is relative to


def trainer_contenders(args) -> list[Contender]:
    """The classic recipe (fixed: 1 x 4 at 512 tokens) and Trainer at its best with the same
    sequences per optimizer step as minift, as (sequences / 2) x 2. Both measured for memory."""
    half = args.sequences_per_step // 2

    def classic(args, round_index):
        with tempfile.TemporaryDirectory() as out:  # a classic step is 4 tweets padded to 512: slow on a CPU
            return run_trainer("trainer-classic", "Trainer, classic recipe (max_length 512, 1x4)",
                               args.model_type, tokenized_tweets(args.model_type)[1],
                               max_length_padding=True, batch_size=1, grad_accum=4, group_by_length=False,
                               steps=max(1, args.steps // 2), warmup=args.warmup, output_dir=out,
                               precision=args.precision, seed=round_index, shape=args.shape)

    def best(args, round_index):
        with tempfile.TemporaryDirectory() as out:
            return run_trainer(BEST, f"Trainer at its best (dynamic /8 + group_by_length, {half}x2)",
                               args.model_type, tokenized_tweets(args.model_type)[1],
                               max_length_padding=False, batch_size=half, grad_accum=2, group_by_length=True,
                               steps=args.steps, warmup=args.warmup, output_dir=out, precision=args.precision,
                               seed=round_index, shape=args.shape)

    def best_compiled(args, round_index):
        with tempfile.TemporaryDirectory() as out:
            return run_trainer("trainer-best-compile", f"Trainer at its best + torch_compile=True ({half}x2)",
                               args.model_type, tokenized_tweets(args.model_type)[1],
                               max_length_padding=False, batch_size=half, grad_accum=2, group_by_length=True,
                               steps=args.steps, warmup=args.warmup, output_dir=out, precision=args.precision,
                               seed=round_index, compile_model=True, shape=args.shape)

    contenders = [Contender("trainer-classic", "Trainer, classic recipe (max_length 512, 1x4)", classic,
                            memory=True),
                  Contender(BEST, f"Trainer at its best (dynamic /8 + group_by_length, {half}x2)", best,
                            memory=True)]
    if args.compile:
        contenders.append(Contender("trainer-best-compile", "Trainer at its best + torch_compile=True",
                                    best_compiled))
    return contenders
