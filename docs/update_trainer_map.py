"""The citation table of docs/trainer-map.md: each row names a Trainer behaviour, the transformers
(or accelerate) code that does it and the minift code that does the same job. Both sides are cited
as ``file:line`` plus the code on that line; the code is what finds the line again after it moves.

    python3 docs/update_trainer_map.py          # rewrite the line numbers
    python3 docs/update_trainer_map.py --check  # what tests/test_docs.py runs

The text of docs/how-trainer-works.md and docs/trainer-map.md cites upstream lines too; those are
checked against ``prose_anchors`` (rewrite them by hand: prose has no code column to find them by),
and the minift names the text uses must exist.

A citation is checked strictly: the quoted code must occur on exactly one line (or run of lines,
parts joined by `` ⏎ ``) of its file. None is a stale citation, several an ambiguous one; both
are errors, never "the first match". The transformers/accelerate half is checked only when the
installed versions are the pinned ones (line numbers differ between releases); otherwise it says
so and skips that half.
"""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "trainer-map.md"
PINS = {"transformers": "5.24.0", "accelerate": "1.15.0", "trl": "1.16.0"}  # trl: docs/grpo.md
NEXT_LINE = " ⏎ "  # joins the parts of a citation that spans consecutive lines

_T, _A = "transformers", "accelerate"
NOT_YET = "**not yet**"
# (Trainer behaviour, upstream file, upstream code, minift file, minift code, note: why minift differs)
rows = [
 # -- TrainingArguments defaults -----------------------------------------------------------------------
 ("`TrainingArguments` fields", f"{_T}/training_args.py", "class TrainingArguments:", "minift/config.py", "class TrainSection:", "one typed dataclass per TOML section; unknown keys and wrong types are errors naming the key"),
 ("`per_device_train_batch_size` = 8", f"{_T}/training_args.py", "per_device_train_batch_size: int = field(default=8", "minift/config.py", "batch_size: int = option(8,", "same default"),
 ("`gradient_accumulation_steps` = 1", f"{_T}/training_args.py", "gradient_accumulation_steps: int = field(", "minift/config.py", "grad_accum: int = option(4,", "**differs**: minift's recipe steps on 8 × 4 = 32 sequences, the classic recipe's accumulation of 4; `compat = \"trainer\"` defaults to 1"),
 ("`learning_rate` = 5e-5 (and wd 0, betas 0.9/0.999, eps 1e-8, `max_grad_norm` 1.0)", f"{_T}/training_args.py", "learning_rate: float = field(default=5e-5", "minift/config.py", "lr: float = option(5e-5,", "same defaults"),
 ("`seed` = 42", f"{_T}/training_args.py", "seed: int = field(default=42", "minift/config.py", "seed: int = option(0,", "**differs**: any fixed seed reproduces; minift's is 0; `compat = \"trainer\"` defaults to 42"),
 ("`num_train_epochs` = 3", f"{_T}/training_args.py", "num_train_epochs: float = field(default=3.0", "minift/config.py", "epochs: float = option(1.0,", "**differs**: one pass over the 27k tweets is minift's recipe; `compat = \"trainer\"` defaults to 3"),
 ("`warmup_steps` < 1 is a ratio of the total steps", f"{_T}/training_args.py", "int(self.warmup_steps) if self.warmup_steps >= 1 else math.ceil(num_training_steps * self.warmup_steps)", "minift/optim.py", "return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)", "**differs**: two typed keys (`warmup_steps` int, `warmup_ratio`), so 0.5 steps is an error, not a silent ratio; `compat = \"trainer\"` reads `warmup_steps < 1` as the ratio (`config.resolve_compat`)"),
 ("`logging_steps` = 500", f"{_T}/training_args.py", "logging_steps: float = field(", "minift/config.py", "log_every: int = option(1,", "**differs**: a JSON line per step is cheap and plots the whole curve; `compat = \"trainer\"` defaults to 500"),
 ("`per_device_eval_batch_size` = 8", f"{_T}/training_args.py", "per_device_eval_batch_size: int = field(", "minift/config.py", "batch_size: int = option(32,", "**differs**: evaluation keeps no activations for backward, so 4× the training batch fits; `compat = \"trainer\"` defaults to 8"),
 ("`train_sampling_strategy` = \"random\"", f"{_T}/training_args.py", "train_sampling_strategy: str = field(", "minift/config.py", "sampler: str = option(\"length_grouped\",", "**differs**: with dynamic padding, length grouping lifts padding efficiency from 0.50 (random batches of 32) to 0.97 on the train tweets (`python3 benchmarks/padding.py`); `compat = \"trainer\"` defaults to random"),
 ("Trainer's defaults, applied by `train.compat = \"trainer\"`", f"{_T}/training_args.py", "class TrainingArguments:", "minift/config.py", "def resolve_compat(raw: dict[str, Any]) -> dict[str, Any]:", "fills only keys the TOML and `--set` did not give"),
 ("`set_seed(seed)`", f"{_T}/trainer_utils.py", "def set_seed(", "minift/runtime.py", "def seed_everything(seed: int) -> None:", "python, numpy and torch RNGs"),
 # -- data: collator, columns, samplers ----------------------------------------------------------------
 ("`DataCollatorForLanguageModeling(mlm=False)`", f"{_T}/data/data_collator.py", "class DataCollatorForLanguageModeling(", "minift/collate.py", "class Collator:", "right-pads to the longest sequence; **differs**: labels are masked where `attention_mask` is 0, not where the id equals the pad id (GPT-2 pads with EOS, and Trainer's collator masks a real EOS too); also returns the counts"),
 ("its labels: the input ids, -100 where the id is the pad id", f"{_T}/data/data_collator.py", "labels = batch[\"input_ids\"].clone()" + NEXT_LINE + "if self.tokenizer.pad_token_id is not None:" + NEXT_LINE + "labels[labels == self.tokenizer.pad_token_id] = -100", "minift/collate.py", "labels[row, :length] = self.example_labels(example, ids)", "labels start as -100 everywhere and take the ids of the real tokens (under `data.objective = \"completion\"` only after the prompt); neither collator shifts them: the model's loss does (`labels[:, 1:]`)"),
 ("`remove_unused_columns` = True", f"{_T}/trainer.py", "dataset = self._remove_unused_columns(dataset, description=description)", "minift/collate.py", "MODEL_INPUTS = (\"input_ids\", \"attention_mask\", \"labels\", \"position_ids\", \"document_ids\")", "Trainer drops the dataset columns `model.forward` does not take, before collating; minift's examples hold only token ids, prompt lengths and label indices, and `collate.model_inputs` passes the model the keys it takes while the collator's counts stay in the batch for the loop"),
 ("`dataloader_drop_last` = False", f"{_T}/training_args.py", "dataloader_drop_last: bool = field(", "minift/sampling.py", "return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]", "same default: the epoch's last, short batch is kept. minift has no switch (under torchrun it leaves out only the global batches that cannot give every rank one, `dropped_examples`); a researcher adds `[data] drop_last` and lets `BatchSampler._cut` stop at `len(order) - len(order) % batch_size`"),
 ("`group_by_length`: megabatches of a whole optimizer step", f"{_T}/trainer.py", "self.args.train_batch_size * self.args.gradient_accumulation_steps,", "minift/sampling.py", "order = trainer_length_grouped_indices(self.lengths, self.batch_size * self.grad_accum, generator)", "`compat = \"trainer\"`: `TrainerLengthGroupedSampler`, cut into micro-batches afterwards as Trainer's DataLoader does"),
 ("megabatch multiplier `min(n // (4·bs), 50)`", f"{_T}/trainer_pt_utils.py", "mega_batch_mult = min(len(lengths) // (batch_size * 4), 50)", "minift/sampling.py", "multiplier = min(len(lengths) // (batch_size * 4), 50) or 1", "`compat = \"trainer\"`"),
 ("the longest example swapped to the front", f"{_T}/trainer_pt_utils.py", "megabatches[0][0], megabatches[max_idx][0] = megabatches[max_idx][0], megabatches[0][0]", "minift/sampling.py", "megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]", "`compat = \"trainer\"`"),
 ("`get_length_grouped_indices` (Trainer's grouping)", f"{_T}/trainer_pt_utils.py", "def get_length_grouped_indices(", "minift/sampling.py", "class LengthGroupedSampler(BatchSampler):", "**differs** (minift's default): megabatches of 50 micro-batches, then the batches shuffled with the longest batch first. Trainer keeps each megabatch in order, so lengths fall from longest to shortest within every megabatch and a run's loss curve shows that sawtooth; minift's shuffled batches do not trend"),
 ("group_by_length draws from torch's global RNG", f"{_T}/trainer_pt_utils.py", "indices = torch.randperm(len(lengths), generator=generator)", "minift/sampling.py", "def _draw_loader_base_seed(generator: torch.Generator) -> None:", "`compat = \"trainer\"` replays that stream (the DataLoader's base-seed draw, then the permutation), so epochs after the first match only while nothing else drew from the global RNG (dropout 0, no evaluation mid-epoch); minift's own samplers have their own generator and never depend on dropout"),
 ("random order: accelerate's `SeedableRandomSampler`, seed + epoch", f"{_A}/data_loader.py", "seed = self.epoch + self.initial_seed", "minift/sampling.py", "generator = torch.Generator().manual_seed(self.seed + epoch)", "`compat = \"trainer\"`: `TrainerRandomSampler`"),
 ("`data_seed`: the random order's seed, when given", f"{_A}/data_loader.py", "self.initial_seed = data_seed if data_seed is not None else torch.random.initial_seed()", "minift/components.py", "return cfg.train.seed if cfg.train.data_seed < 0 else cfg.train.data_seed", "same: `[train] data_seed` (-1 = `seed`) seeds minift's samplers and, under `compat = \"trainer\"`, Trainer's random order (`data_seed + epoch`) and group_by_length's eval batches; group_by_length's train megabatches keep drawing from Trainer's global RNG, seeded `seed`, as in Trainer. Side-by-side rows `data_seed` (random) and `data_seed, group_by_length`"),
 ("Trainer's `RandomSampler` becomes seedable", f"{_A}/data_loader.py", "if isinstance(sampler, RandomSampler) and use_seedable_sampler:", "minift/sampling.py", "generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)", "**differs** (minift's default): with seed + epoch, seed s in epoch 1 replays seed s + 1 in epoch 0; spreading the seeds keeps runs with neighbouring seeds apart"),
 ("`train_sampling_strategy=\"sequential\"`", f"{_T}/trainer.py", "return SequentialSampler(train_dataset)", "minift/sampling.py", "class SequentialSampler(BatchSampler):", ""),
 ("`train_sampling_strategy=\"batch_rebalance\"`", f"{_T}/trainer.py", "elif self.args.train_sampling_strategy == \"batch_rebalance\":", "minift/sampling.py", "class PackedSampler(BatchSampler):", "none in minift. `BatchRebalanceSampler` cuts each optimizer step's shuffled examples into micro-batches of *varying* sizes whose cost (tokens plus a quadratic attention term) is balanced across ranks; minift's answers to uneven lengths are `length_grouped` (less padding) and `packed` (one shape). It would be one more `BatchSampler` whose `global_batches` returns such batches: the loop's window count already weighs tokens, not batches"),
 # -- one optimizer step ----------------------------------------------------------------------------------
 ("the inner training loop (`_inner_training_loop`)", f"{_T}/trainer.py", "def _inner_training_loop(", "minift/loop.py", "def train(", "one function read top to bottom; logging, evaluation and checkpoints are `Hooks` called at fixed points"),
 ("`model.train()` before every micro-batch", f"{_T}/trainer.py", "model.train()" + NEXT_LINE + "if hasattr(self.optimizer, \"train\") and callable(self.optimizer.train):", "minift/loop.py", "model.train()", "minift sets it once before the loop and `evaluate.evaluate` puts the mode back; dropout is active in training on both sides (its masks come from torch's global RNG, seeded by `seed`)"),
 ("fetch the accumulation window first (`get_batch_samples`)", f"{_T}/trainer.py", "batch_samples, num_items_in_batch = self.get_batch_samples(epoch_iterator, num_batches, self.args.device)", "minift/loop.py", "window = next(windows)", "a window never spans two epochs; the last may be short"),
 ("`num_items_in_batch` (loss denominator)", f"{_T}/trainer.py", "num_items_in_batch = sum(labels.ne(-100).sum() for labels in labels_for_count)", "minift/loop.py", "sum(loss_fn.count(b) for b in window)", "counted before the first backward, summed over ranks"),
 ("unshifted count for `loss_type` None (GPT-1 and GPT-2)", f"{_T}/trainer.py", "self._loss_shifts_labels = LOSS_MAPPING.get(", "minift/collate.py", "\"n_label_tokens\": int((labels != IGNORE_INDEX).sum()),", "**differs**: minift divides by the next-token targets (`n_loss_targets`), so the loss is the mean CE per target and exp(loss) a perplexity; Trainer also counts each sequence's first token; `loss_denominator = \"trainer\"` (implied by `compat = \"trainer\"`) divides by this count"),
 ("`model_accepts_loss_kwargs`: the model gets `num_items_in_batch`", f"{_T}/trainer.py", "if hasattr(unwrapped_model, \"accepts_loss_kwargs\"):", "minift/loop.py", "out.loss_sum / denominator", "true when `forward` takes `**kwargs` (GPT-1 and GPT-2 do), so the model divides its summed CE by the window's count; minift's models return the sum and the loop always divides"),
 ("otherwise each micro-batch's loss / the window's micro-batches", f"{_T}/trainer.py", "loss = loss / self.current_gradient_accumulation_steps", "minift/loop.py", "out.loss_sum / denominator", "Trainer's fallback for a loss not normalized by `num_items_in_batch` (no loss kwargs, or `loss_is_scaled_for_ga = False`): every micro-batch's *mean* weighs the same, whatever its tokens. minift has one rule, the window's summed loss over its count"),
 ("`compute_loss_func(outputs, labels, num_items_in_batch)`", f"{_T}/trainer.py", "loss = self.compute_loss_func(", "minift/loop.py", "class NextTokenLoss:", "a loss object handed to `loop.train(loss=...)`: `count(batch)` is its share of the window's denominator, `__call__` returns the micro-batch's summed loss (and optional `metric_sums`); DPO and the reward model are such objects"),
 ("the model's `loss_function`: `loss_type` None falls back to `ForCausalLMLoss`", f"{_T}/modeling_utils.py", "def loss_function(self):", "minift/models/lm_loss.py", "def lm_loss_sum(", "the source of the run's warning `loss_type=None … Using the default loss: ForCausalLMLoss`: GPT-1's and GPT-2's class names match no `LOSS_MAPPING` key, so their loss is the shifted next-token CE while Trainer's count check (row above) sees no `ForCausalLMLoss`. minift's models compute that CE themselves"),
 ("`ForCausalLMLoss(reduction=\"sum\") / num_items_in_batch`", f"{_T}/loss/loss_utils.py", "loss = loss / num_items_in_batch", "minift/loop.py", "out.loss_sum / denominator", "the model returns the summed CE (`models.lm_loss.fused_lm_loss_sum` by default, `models.lm_loss.lm_loss_sum` unfused)"),
 ("shifted next-token CE, `ignore_index=-100`", f"{_T}/loss/loss_utils.py", "def ForCausalLMLoss(", "minift/models/lm_loss.py", "targets = labels[:, 1:]" + NEXT_LINE + "if rows == \"labelled\":", "on CPU only labelled rows reach the LM head (`model.loss_rows`; `lm_loss_sum_all_positions` is Trainer's way, for comparison)"),
 ("`label_smoothing_factor`: `LabelSmoother`", f"{_T}/trainer_pt_utils.py", "class LabelSmoother:", "minift/models/lm_loss.py", "return (1 - epsilon) * nll_sum + epsilon * uniform_sum, nll_sum, int(keep.sum())", "same: `[train] label_smoothing`, the loss object `label_smoothing.LabelSmoothedLoss` beside `NextTokenLoss`: the labels taken out, the model's logits (the true vocabulary: the padding rows of `model.pad_vocab_to` are not in the mean), (1 − ε)·NLL + ε·(mean over the vocabulary of −log p) on the shifted labels, summed; the loop divides by the window's count as Trainer divides by `num_items_in_batch`. Under `compat = \"trainer\"` the eval loss is smoothed too, as Trainer's `eval_loss` (perplexity stays the plain CE's); each step logs the plain CE as `nll`. Side-by-side row `label_smoothing`"),
 ("`average_tokens_across_devices` = True", f"{_T}/trainer.py", "loss *= loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu", "minift/loop.py", "denominator = n_counted.clamp(min=1) / dist.world_size if dist.enabled else max(n_counted, 1)", "the count summed over ranks and each rank's loss multiplied by the number of processes, so DDP's gradient average is the gradient of the global token mean; minift always does this"),
 ("`accelerator.backward(loss)` with `no_sync` under DDP", f"{_T}/trainer.py", "self.accelerator.backward(loss, **kwargs)", "minift/loop.py", "scaler.scale(", ""),
 ("the step's logged loss: sum of the micro-batch losses", f"{_T}/trainer.py", "self._tr_loss += tr_loss_step", "minift/loop.py", "loss_sum += out.loss_sum.detach()", "minift sums in float64 and divides once; Trainer adds float32 quotients (differences ~1e-7)"),
 ("`logging_nan_inf_filter` = True", f"{_T}/trainer.py", "self._tr_loss += self._tr_loss / (1 + self.state.global_step - self._globalstep_last_logged)", "minift/config.py", "on_nonfinite: str = option(\"stop\",", "**differs**: Trainer replaces a NaN/inf micro-batch loss in the *logged* sum by the mean so far (and drops non-finite eval losses), while the optimizer still steps on that gradient. minift stops the run (default) or, with `on_nonfinite = \"skip\"`, drops the step's update and counts it"),
 ("`clip_grad_norm_(model.parameters(), max_grad_norm)`; logged `grad_norm` is pre-clip", f"{_T}/trainer.py", "grad_norm = self._clip_grad_norm(model)", "minift/optim.py", "grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)", ""),
 ("`optimizer.step()`; skipped under fp16 overflow", f"{_T}/trainer.py", "self.optimizer.step()", "minift/optim.py", "scaler.step(optimizer)", "GradScaler skips and lowers the scale; counted in `skipped_overflow`"),
 ("logged `learning_rate`: the rate this step used", f"{_T}/trainer.py", "learning_rate = self._get_learning_rate()", "minift/optim.py", "lr = optimizer.param_groups[0][\"lr\"]", "read before the scheduler steps, as Trainer"),
 ("`lr_scheduler.step()` (not after a skipped fp16 step)", f"{_T}/trainer.py", "self.lr_scheduler.step()", "minift/optim.py", "scheduler.step()", ""),
 ("`model.zero_grad()` after every optimizer step", f"{_T}/trainer.py", "model.zero_grad()" + NEXT_LINE + "self.state.global_step += 1", "minift/optim.py", "scheduler.step()" + NEXT_LINE + "optimizer.zero_grad(set_to_none=True)", "the per-step call, right after the scheduler (the other `zero_grad` in `loop.py` drops a non-finite step's gradients)"),
 # -- precision, optimizer, schedule --------------------------------------------------------------------
 ("Trainer's own autocast helper does nothing", f"{_T}/trainer.py", "def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> contextlib.AbstractContextManager:", "minift/precision.py", "def autocast(self):", "`compute_loss_context_manager` enters it around `compute_loss`, but it returns `nullcontext()`: autocast comes from accelerate (next row). `loop.train` enters `precision.Precision.autocast` around each micro-batch's forward and loss"),
 ("`fp16=True` / `bf16=True`: `prepare_model` wraps `model.forward` in autocast", f"{_A}/accelerator.py", "model.forward = convert_outputs_to_fp32(autocast_context(model_forward_func))", "minift/precision.py", "return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)", "the forward pass, transformers' loss inside it (`ForCausalLMLoss` upcasts the logits to float32) and outputs cast back to float32; `Accelerator.autocast` is not on Trainer's path. minift's cross-entropy also accumulates in float32 (`models.lm_loss.loss_dtype_for`)"),
 ("fp16's GradScaler", f"{_A}/accelerator.py", "self.scaler = get_grad_scaler(self.distributed_type, **kwargs)", "minift/precision.py", "self.scaler = torch.amp.GradScaler(self.device.type, enabled=name == \"fp16\")", "one `Precision` object owns autocast and the scaler; bf16 has no scaler on either side"),
 ("`get_decay_parameter_names` (no decay for biases and LayerNorm)", f"{_T}/trainer.py", "def get_decay_parameter_names(", "minift/optim.py", "def decay_parameter_names(model: nn.Module) -> list[str]:", "tied head counted once"),
 ("two parameter groups: `weight_decay` and 0.0", f"{_T}/trainer.py", "\"weight_decay\": self.args.weight_decay,", "minift/optim.py", "{\"params\": [p for n, p in params.items() if n in decay], \"weight_decay\": weight_decay},", ""),
 ("the optimizer holds only parameters that require a gradient (a base frozen under peft)", f"{_T}/trainer.py", "p for n, p in opt_model.named_parameters() if (n in decay_parameters and p.requires_grad)", "minift/optim.py", "params = {name: p for name, p in model.named_parameters() if p.requires_grad}", "same: with a LoRA adapter (`minift.lora`) only the adapter's parameters"),
 ("`optim=\"adamw_torch_fused\"` (the default with torch ≥ 2.8)", f"{_T}/training_args.py", "default_optim = \"adamw_torch_fused\"", "minift/optim.py", "return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=use_fused or None,", "fused where supported (CPU too)"),
 ("`get_scheduler`: `\"linear\"` (the default) and `\"cosine\"` with warmup", f"{_T}/optimization.py", "def get_scheduler(", "minift/optim.py", "def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):", "same formulas, same names; under `compat = \"trainer\"` `schedule` takes Trainer's names (`config.TRAINER_SCHEDULES`: linear, cosine, constant, constant_with_warmup)"),
 ("`lr_scheduler_type=\"constant\"` ignores the warmup", f"{_T}/optimization.py", "if name == SchedulerType.CONSTANT:" + NEXT_LINE + "return schedule_func(optimizer)", "minift/optim.py", "def constant(k: int) -> float:" + NEXT_LINE + "return k / max(1, warmup_steps) if k < warmup_steps else 1.0", "**differs** in name: minift's `schedule = \"constant\"` warms up, i.e. Trainer's `\"constant_with_warmup\"`; Trainer's `\"constant\"` returns `get_constant_schedule` before reading `num_warmup_steps`, so a warmup given with it is ignored. Under `compat = \"trainer\"` the names are Trainer's (`config.resolve_compat`): \"constant\" drops the warmup, \"constant_with_warmup\" is minift's \"constant\". Side-by-side rows `schedule constant`, `schedule constant_with_warmup`"),
 # -- logging -----------------------------------------------------------------------------------------------
 ("`logging_steps` = N logs the mean loss of the N steps", f"{_T}/trainer.py", "logs[\"loss\"] = tr_loss_scalar / (self.state.global_step - self._globalstep_last_logged)", "minift/metrics.py", "return {**record, \"loss\": sum(losses) / len(losses), \"step_loss\": record[\"loss\"]}", "**differs** (minift's default): a written record is one step's own numbers (its loss, lr, grad-norm and tokens belong together); `compat = \"trainer\"` writes the window's mean loss and keeps the step's in `step_loss`"),
 ("`logging_first_step`", f"{_T}/trainer_callback.py", "if state.global_step == 1 and args.logging_first_step:", "minift/metrics.py", "first = self.first_step and record.get(\"step\") == 1", "same: `[train] logging_first_step` writes step 1's record, its window that one step, and the next window starts at step 2 (minift's default, `log_every = 1`, writes step 1 anyway). Side-by-side row `logging_first_step`"),
 ("`log_history`", f"{_T}/trainer.py", "self.state.log_history.append(output)", "minift/metrics.py", "class MetricsLogger:", "`metrics.jsonl`, one line per logged step"),
 ("the final `train_loss` metric", f"{_T}/trainer.py", "train_loss = self._total_loss_scalar / max(num_steps_trained, 0.001)  # Avoid ZeroDivisionError", "minift/orchestration.py", "def mean_step_loss(records: list[dict[str, Any]]) -> float | None:", "same: the summary's `train_loss` is the mean of every step's loss since the process started (a resumed run: since the resume, as each `train()` call of Trainer), logged or not; a NaN/inf step is left out, where Trainer's `logging_nan_inf_filter` counts the window's mean instead. Every side-by-side row compares it"),
 # -- callbacks --------------------------------------------------------------------------------------------
 ("`TrainerState`", f"{_T}/trainer_callback.py", "class TrainerState:", "minift/loop.py", "class TrainState:", "Trainer's holds `global_step`, `epoch`, `log_history`, `best_metric`, `best_model_checkpoint` (saved as `trainer_state.json`); minift's holds the step, its skipped-step and token counters, the best metric, its step and checkpoint and the early-stopping count (the epoch lives in the sampler, the history in `metrics.jsonl`), saved in `training_state.pt`"),
 ("`TrainerCallback`: `on_*` events", f"{_T}/trainer_callback.py", "class TrainerCallback:", "minift/loop.py", "class Hooks:", "objects called with `(args, state, control)` plus the model, optimizer and loaders at every event; minift's `Hooks` are plain functions called at fixed points, none of which can change the step's maths (how-trainer-works.md, *Callbacks*)"),
 ("`CallbackHandler`, built in `Trainer.__init__`", f"{_T}/trainer.py", "self.callback_handler = CallbackHandler(", "minift/loop.py", "class Hooks:", "calls each callback in turn and keeps the `TrainerControl` one returns; minift's recipe builds its one `Hooks` (`components.build_hooks`) from `[train]`'s cadences"),
 ("`TrainerControl` flags", f"{_T}/trainer_callback.py", "class TrainerControl(ExportableState):", "minift/loop.py", "should_stop: Callable[[], bool] = lambda: False", "`should_log` / `should_evaluate` / `should_save` become the cadences of `Hooks` (`log_every`, `eval_every` or `eval_per_epoch`, `checkpoint_every` or `checkpoint_per_epoch`); `should_training_stop` is `should_stop()` returning True (the recipe's SIGINT/SIGTERM handler, or early stopping); `should_epoch_stop` has no counterpart"),
 ("`DefaultFlowCallback`: when to log, evaluate, save", f"{_T}/trainer_callback.py", "class DefaultFlowCallback(TrainerCallback):", "minift/loop.py", "def due(self, step: int, total_steps: int, epoch_end: bool) -> tuple[bool, bool]:", "every `logging_steps` / `eval_steps` / `save_steps`, and for the steps strategies an evaluation and a save at the last step; per epoch in `on_epoch_end`, which a run stopped by `max_steps` reaches after its partial last epoch too. `Hooks.due` picks the same steps (a test runs both); minift writes its last checkpoint after the loop"),
 ("`on_epoch_end` after each epoch's last step", f"{_T}/trainer.py", "self.control = self.callback_handler.on_epoch_end(self.args, self.state, self.control)", "minift/loop.py", "\"epoch_end\": self.sampler.consumed >= epoch_length}", "the step source says which step ends an epoch (`LoaderSteps.step_done`, from the position each window ends at, also when the next window was fetched ahead); the loop then calls `Hooks.on_epoch_end`, between the evaluation and the checkpoint of that step"),
 # -- evaluation ---------------------------------------------------------------------------------------------
 ("`evaluation_loop`", f"{_T}/trainer.py", "def evaluation_loop(", "minift/evaluate.py", "def evaluate(model, ", ""),
 ("`eval_strategy` = \"no\"", f"{_T}/training_args.py", "eval_strategy: IntervalStrategy | str = field(", "minift/config.py", "eval_strategy: str = option(\"steps\",", "**differs** in default: Trainer evaluates during `train()` only when asked; minift evaluates before the first step and after the last, and during training as `[train] eval_strategy` says, Trainer's names: \"steps\" every `eval_every` steps (0 = none), \"epoch\" after every epoch, \"no\" none. `compat = \"trainer\"` defaults to \"no\", and \"steps\" without `eval_every` to `log_every` (Trainer's `eval_steps` = `logging_steps`). Side-by-side rows `eval+save per steps`, `best model, per epoch`"),
 ("eval: each batch divided by its own count", f"{_T}/trainer.py", "num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)", "minift/evaluate.py", "def trainer_eval_loss(", "`compat = \"trainer\"`"),
 ("eval: batch losses repeated once per sequence, then averaged", f"{_T}/trainer.py", "losses = self.gather_function(losses.repeat(batch_size))", "minift/evaluate.py", "return sum(total / max(1, count) * n for total, count, n in per_batch) / max(1, sequences)", "`compat = \"trainer\"` (accelerate cuts the last batch's copies to its real size)"),
 ("`eval_loss` = mean over sequences", f"{_T}/trainer.py", "metrics[f\"{metric_key_prefix}_loss\"] = losses.mean().item()", "minift/evaluate.py", "loss = loss_sum / max(1, n_targets)", "**differs** (minift's default): the whole set's CE over its next-token targets does not depend on how the set is batched or ordered, and exp(loss) is its perplexity; Trainer's weighs a short tweet's tokens more than a long one's"),
 ("eval batches under group_by_length: own generator seeded `seed`", f"{_T}/trainer.py", "generator=torch.Generator().manual_seed(", "minift/sampling.py", "order = trainer_length_grouped_indices(lengths, batch_size, torch.Generator().manual_seed(seed))", "`compat = \"trainer\"`; otherwise dataset order, as Trainer"),
 ("`compute_metrics` / `preprocess_logits_for_metrics`", f"{_T}/trainer.py", "logits = self.preprocess_logits_for_metrics(logits, labels)", "minift/evaluate.py", "def accuracy_and_macro_f1(", "Trainer gathers every batch's logits and labels for a user function; minift computes its metrics itself: loss, perplexity and label-scoring accuracy/macro-F1 (each label word's log-probability after the prompt, `evaluate.label_log_probs`), never keeping [N × T × vocab] logits. Another metric goes into `evaluate.EvalResult` and from there into `metrics.jsonl`"),
 ("`eval_accumulation_steps`", f"{_T}/trainer.py", "elif args.eval_accumulation_steps is not None and (step + 1) % args.eval_accumulation_steps == 0:", "minift/evaluate.py", "def per_batch_loss_sums(", "nothing to move off the device: minift keeps three numbers per eval batch (summed CE, count, sequences) and the label scores; Trainer's setting moves the gathered logits to the CPU every N batches"),
 # -- checkpoints, best model, early stopping, resume -----------------------------------------------------
 ("`save_strategy` = \"steps\" (`save_steps` 500)", f"{_T}/training_args.py", "save_strategy: SaveStrategy | str = field(", "minift/config.py", "save_strategy: str = option(\"steps\",", "**differs**: minift always writes a last checkpoint; during training `[train] save_strategy` \"steps\" (every `checkpoint_every`, 0 = none), \"epoch\" or \"no\", Trainer's names (`\"best\"` is not supported). `compat = \"trainer\"` defaults to \"steps\" every 500. Side-by-side rows `eval+save per steps`, `best model, per epoch`"),
 ("checkpoint contents: model and tokenizer, `optimizer.pt`, `scheduler.pt`, `scaler.pt`, `rng_state.pth`, `trainer_state.json`, `training_args.bin`", f"{_T}/trainer.py", "def _save_checkpoint(", "minift/checkpoint.py", "training_state = {**optimizer, \"scheduler\": parts.scheduler.state_dict(),", "minift: one `training_state.pt` (optimizer, scheduler, scaler, RNG states, sampler position, counters), `run_config.json`, the model and tokenizer in the transformers layout, and a checksummed `manifest.json`"),
 ("`scaler.pt` (fp16's GradScaler)", f"{_T}/trainer.py", "self._save_scaler(output_dir)", "minift/checkpoint.py", "\"precision\": parts.precision.state_dict(), \"rng\": rng, \"sampler\": samplers,", "in `training_state.pt`, with the RNG states and sampler positions"),
 ("`training_args.bin`, written with the model", f"{_T}/trainer.py", "# Good practice: save your training arguments together with the trained model" + NEXT_LINE + "torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))", "minift/checkpoint.py", "(tmp / RUN_CONFIG).write_text(json.dumps(run_config, indent=2, sort_keys=True) + \"\\n\")", "the run's settings as JSON; resume compares them with the new run's and refuses a change that alters the maths unless `--resume-with-changes`"),
 ("`save_total_limit`", f"{_T}/trainer_utils.py", "def rotate_checkpoints(", "minift/checkpoint.py", "def prune_checkpoints(output_dir: Path, keep: int, log: Callable[[str], None] = print,", "**differs**: Trainer keeps every checkpoint by default, minift the newest 2 (`keep_checkpoints`); pruned only after the new checkpoint is complete, counting only verified checkpoints"),
 ("the best checkpoint is protected from rotation", f"{_T}/trainer_utils.py", "protected.add(str(Path(best_model_checkpoint)))", "minift/checkpoint.py", "protected = set(names[:1]) | ({protect.name} & set(names) if protect is not None else set())", "same: `prune_checkpoints(protect=)` keeps the best checkpoint beside the newest and prunes the oldest others until `max(keep_checkpoints, protected)` remain (a test compares it with `rotate_checkpoints`)"),
 ("`metric_for_best_model`, `greater_is_better`: `_determine_best_metric`", f"{_T}/trainer.py", "def _determine_best_metric(", "minift/selection.py", "def after_evaluation(self, state, result: dict[str, Any] | None) -> None:", "same: after each evaluation during training `selection.ModelSelection` compares `[train] metric_for_best_model` (`loss` or `eval_loss`; \"loss\" by default with `load_best_model_at_end` or early stopping) the way `greater_is_better` says (\"auto\": lower is better for a name ending in \"loss\"), and keeps the best value and step in `TrainState`, saved in every checkpoint; a checkpoint written at that step becomes the best checkpoint (Trainer's `best_model_checkpoint`)"),
 ("`load_best_model_at_end`: `_load_best_model`", f"{_T}/trainer.py", "def _load_best_model(self) -> None:", "minift/orchestration.py", "def _load_best_model(stage: Stage, state: TrainState, ctx: RunContext, selection: ModelSelection", "same: after the last step `[train] load_best_model_at_end` loads the best checkpoint's weights (`Stage.load_model_weights`), then evaluates them (the eval record carries `best_model_step`) and exports them to `model/`; the summary's `best_model` gives metric, value and step. As in Trainer, it needs the eval and save strategies to match (and `checkpoint_every` a multiple of `eval_every`). Side-by-side row `best model, per epoch`"),
 ("`EarlyStoppingCallback` (patience, threshold)", f"{_T}/trainer_callback.py", "class EarlyStoppingCallback(TrainerCallback, ExportableState):" + NEXT_LINE + "\"\"\"", "minift/selection.py", "state.evals_without_improvement += 1", "same: `[train] early_stopping_patience` and `early_stopping_threshold`; an evaluation that does not beat the best metric by more than the threshold counts, checked before the best metric moves, and `Hooks.should_stop` stops the run after `patience` of them in a row. The count is in `TrainState` (checkpoints); a stopped run still writes its last checkpoint, evaluation and model, and a resumed one stops again at once. Side-by-side row `early stopping`"),
 ("`resume_from_checkpoint`", f"{_T}/trainer.py", "self._load_from_checkpoint(resume_from_checkpoint)", "minift/checkpoint.py", "def resume_training(resume: str | Path | bool, output_dir: str | Path, state, parts: TrainingParts, dist,", "weights, optimizer, scheduler, scaler, sampler position, RNG: bit-identical on CPU; refuses changed settings unless --resume-with-changes"),
 ("skipping already-seen batches on resume", f"{_T}/trainer.py", "train_dataloader = skip_first_batches(train_dataloader, steps_trained_in_current_epoch)", "minift/sampling.py", "yield from self.batches(self.epoch)[self.consumed:]", "the resumed epoch starts at its first unseen batch (next row)"),
 ("… a map-style dataset: `SkipBatchSampler` steps past the first index lists", f"{_A}/data_loader.py", "new_batch_sampler = SkipBatchSampler(batch_sampler, skip_batches=num_batches)", "minift/sampling.py", "yield from self.batches(self.epoch)[self.consumed:]", "**same**: both recompute the epoch's order from its seed and start after the batches already trained on, without loading them; only an `IterableDataset` is replayed (its batches loaded and dropped), and minift has none"),
 ("RNG states restored on resume (`_load_rng_state`)", f"{_T}/trainer.py", "def _load_rng_state(self, checkpoint: str | None) -> None:", "minift/checkpoint.py", "def set_rng_state(state: dict[str, Any]) -> None:", "python, numpy, torch (and CUDA) per rank. When it skips batches, Trainer loads them after fetching the resumed epoch's first window, because creating the DataLoader's iterator draws from torch's RNG; minift's DataLoader has its own generator, so the state is restored once, before the loop"),
 # -- model-side features -----------------------------------------------------------------------------------
 ("`torch_compile`", f"{_T}/trainer.py", "dynamo_plugin = TorchDynamoPlugin(", "minift/config.py", "compile: bool = option(False,", "Trainer hands the backend and mode to accelerate, which compiles in `prepare_model`; minift compiles the (DDP-wrapped) model in `components.wrap_for_training` with `model.compile_mode` and saves the uncompiled one"),
 ("`auto_find_batch_size`", f"{_T}/trainer.py", "self._inner_training_loop, self._train_batch_size, args.auto_find_batch_size", "minift/config.py", "batch_size: int = option(8,", "none in minift: on an out-of-memory error Trainer restarts the inner loop with 90 % of the batch size (accelerate's `find_executable_batch_size`) and the same accumulation, so the optimizer step shrinks. In minift halve `batch_size` and double `grad_accum`: the same step (the window count weighs tokens), less memory"),
 ("`activation_checkpointing` (formerly `gradient_checkpointing`)", f"{_T}/trainer.py", "if args.activation_checkpointing:", "minift/models/gpt2.py", "for i, block in enumerate(self.h):", "none in minift (tweets are short; transformers' `OpenAIGPTLMHeadModel` does not support it, GPT-2 does). A researcher wraps each block in the block loops of `models/gpt1.py` and `models/gpt2.py`: `h = torch.utils.checkpoint.checkpoint(block, h, attn_bias, None, use_reentrant=False)` when `self.training`"),
 ("NEFTune (`neftune_noise_alpha`)", f"{_T}/trainer.py", "self.neftune_hook_handle = activate_neftune(self.model, self.neftune_noise_alpha, self.accelerator)", "minift/neftune.py", "magnitude = float(self.alpha / torch.sqrt(dims))  # float32, as transformers computes it", "same: `[train] neftune_noise_alpha` hooks `model.token_embedding` for the run (uniform noise in ±α/√(L·d) in training mode, L the padded length, d the width), from torch's global RNG; under `compat = \"trainer\"` from `neftune.TrainerRNG`, Trainer's global stream replayed (its seed, each epoch's DataLoader draw and group_by_length permutation, each evaluation's DataLoader draw), so with dropout 0 the noise is Trainer's. With group_by_length, epochs after the first are ordered differently (Trainer's permutation then follows the noise draws). Side-by-side row `neftune`"),
 ("`resize_token_embeddings` after adding `[PAD]`", f"{_T}/modeling_utils.py", "def resize_token_embeddings(", "minift/models/base.py", "def resize_token_embeddings(self, new_vocab_size: int) -> None:", "**differs**: new rows = the mean of the old rows (deterministic); transformers 5.x samples around the mean"),
]


class CitationError(AssertionError):
    pass


def locate(path: Path, code: str) -> int:
    """The 1-based line where ``code`` is; parts joined by NEXT_LINE must be on consecutive
    lines. Exactly one place may match: none is stale, several is ambiguous."""
    lines = path.read_text(encoding="utf-8").splitlines()
    parts = code.split(NEXT_LINE)
    hits = [i + 1 for i in range(len(lines) - len(parts) + 1)
            if all(part in lines[i + k] for k, part in enumerate(parts))]
    if not hits:
        raise CitationError(f"{path}: no line holds {code!r} (stale citation)")
    if len(hits) > 1:
        raise CitationError(f"{path}: {code!r} is on lines {hits} (ambiguous citation: quote more of the line, "
                            f"or the next line after {NEXT_LINE.strip()!r})")
    return hits[0]


def upstream_root(packages=("transformers", "accelerate")) -> tuple[Path | None, str]:
    """site-packages holding the pinned ``packages``, or None and why not."""
    roots = []
    for name in packages:
        pin = PINS[name]
        try:
            module = importlib.import_module(name)
        except ImportError:
            return None, f"{name} is not installed"
        if module.__version__ != pin:
            return None, f"{name} {module.__version__} is installed, the map cites {pin}"
        roots.append(Path(module.__file__).resolve().parents[1])
    return roots[0], ", ".join(f"{name} {PINS[name]}" for name in packages)


def _cell(code: str) -> str:
    return "`" + code.replace("|", "\\|") + "`"


def table_rows(root: Path) -> list[str]:
    out, errors = [], []
    for what, ufile, ucode, mfile, mcode, note in rows:
        try:
            uline, mline = locate(root / ufile, ucode), locate(REPO / mfile, mcode)
        except CitationError as err:
            errors.append(f"{err}; update the row in {__file__}")
            continue
        out.append(f"| {what} | `{ufile}:{uline}` | {_cell(ucode)} | `{mfile}:{mline}` | {_cell(mcode)} | {note} |")
    if errors:
        raise CitationError("\n".join(errors))
    return out


CITATION = re.compile(r"^\| (?P<what>.+?) \| `(?P<ufile>(?:transformers|accelerate|trl)/[\w/]+\.py):"
                      r"(?P<uline>\d+)` \| `(?P<ucode>.+?)` \| `(?P<mfile>minift/[\w/]+\.py):(?P<mline>\d+)` \| "
                      r"`(?P<mcode>.+?)` \| ")


def cited(text: str) -> list[dict]:
    """The citations in the doc's table, codes unescaped."""
    found = []
    for line in text.splitlines():
        match = CITATION.match(line)
        if match:
            row = match.groupdict()
            row["ucode"], row["mcode"] = (row[k].replace("\\|", "|") for k in ("ucode", "mcode"))
            found.append(row)
    return found


def check(text: str, root: Path | None) -> list[str]:
    """Errors for every cited line that does not hold its code, or whose code is not unique.
    ``root`` None: the upstream half is not checked."""
    errors = []
    for row in cited(text):
        sides = [("mfile", "mline", "mcode", REPO)] + ([("ufile", "uline", "ucode", root)] if root else [])
        for file_key, line_key, code_key, base in sides:
            try:
                line = locate(base / row[file_key], row[code_key])
            except CitationError as err:
                errors.append(str(err))
                continue
            if line != int(row[line_key]):
                errors.append(f"{row[file_key]}:{row[line_key]} cites {row[code_key]!r}, which is on line {line} "
                              f"(run python3 docs/update_trainer_map.py)")
    return errors


def table_span(lines: list[str]) -> tuple[int, int]:
    """[start, end) of the citation table's rows: the first table of the doc."""
    start = next(i for i, line in enumerate(lines) if line.startswith("|---")) + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("| "))
    return start, end


# -- citations in the text of the docs ------------------------------------------------------------------
# The prose of these docs cites upstream lines as `file.py:N` or `file.py:N-M` (paths as in the table), or
# as `:N` for the file cited last. Every cited line must be where one of ``prose_anchors`` (file, code) is:
# the anchors are the code the text means, and tests/test_docs.py re-locates them, so a cited number that
# drifts from its code (another pin, a typo) fails. minift is named in prose by module and function, not by
# line; ``unknown_minift_names`` checks that those names exist.
PROSE_DOCS = (REPO / "docs" / "how-trainer-works.md", REPO / "docs" / "trainer-map.md")
prose_anchors = [
 (f"{_A}/accelerator.py", "self.scaler = get_grad_scaler(self.distributed_type, **kwargs)"),
 (f"{_A}/accelerator.py", "model.forward = convert_outputs_to_fp32(autocast_context(model_forward_func))"),
 (f"{_A}/data_loader.py", "self.initial_seed = data_seed if data_seed is not None else torch.random.initial_seed()"),
 (f"{_A}/data_loader.py", "seed = self.epoch + self.initial_seed"),
 (f"{_A}/data_loader.py", "if isinstance(sampler, RandomSampler) and use_seedable_sampler:"),
 (f"{_T}/data/data_collator.py", "labels = batch[\"input_ids\"].clone()"),
 (f"{_T}/loss/loss_utils.py", "reduction = \"sum\" if num_items_in_batch is not None else \"mean\""),
 (f"{_T}/loss/loss_utils.py", "loss = loss / num_items_in_batch"),
 (f"{_T}/loss/loss_utils.py", "def ForCausalLMLoss("),
 (f"{_T}/modeling_utils.py", "loss_type = self.__class__.__name__" + NEXT_LINE + "if loss_type not in LOSS_MAPPING:"),
 (f"{_T}/modeling_utils.py", "self.loss_type = loss_type"),
 (f"{_T}/modeling_utils.py", "def loss_function(self):"),
 (f"{_T}/modeling_utils.py", "if loss_type is None or loss_type not in LOSS_MAPPING:"),
 (f"{_T}/modeling_utils.py", "loss_type = \"ForCausalLM\""),
 (f"{_T}/optimization.py", "if name == SchedulerType.CONSTANT:"),
 (f"{_T}/trainer.py", "enable_full_determinism(self.args.seed) if self.args.full_determinism else set_seed(self.args.seed)"),
 (f"{_T}/trainer.py", "forward_params = inspect.signature(unwrapped_model.forward).parameters"),
 (f"{_T}/trainer.py", "k.kind == inspect.Parameter.VAR_KEYWORD for k in forward_params.values()"),
 (f"{_T}/trainer.py", "self._loss_shifts_labels = LOSS_MAPPING.get("),
 (f"{_T}/trainer.py", "self.callback_handler = CallbackHandler("),
 (f"{_T}/trainer.py", "grad_acc_kwargs[\"num_steps\"] = 1"),
 (f"{_T}/trainer.py", "def _get_train_sampler("),
 (f"{_T}/trainer.py", "return LengthGroupedSampler(" + NEXT_LINE + "self.args.train_batch_size * self.args.gradient_accumulation_steps,"),
 (f"{_T}/trainer.py", "self.args.train_batch_size * self.args.gradient_accumulation_steps,"),
 (f"{_T}/trainer.py", "return LengthGroupedSampler(" + NEXT_LINE + "self.args.eval_batch_size,"),
 (f"{_T}/trainer.py", "self.args.data_seed if self.args.data_seed is not None else self.args.seed"),
 (f"{_T}/trainer.py", "def create_optimizer(self, model=None) -> torch.optim.Optimizer:"),
 (f"{_T}/trainer.py", "decay_parameters = self.get_decay_parameter_names(opt_model)"),
 (f"{_T}/trainer.py", "def train("),
 (f"{_T}/trainer.py", "def _inner_training_loop("),
 (f"{_T}/trainer.py", "train_dataloader = self.get_train_dataloader()"),
 (f"{_T}/trainer.py", "def _run_epoch("),
 (f"{_T}/trainer.py", "batch_samples, num_items_in_batch = self.get_batch_samples(epoch_iterator, num_batches, self.args.device)"),
 (f"{_T}/trainer.py", "self.control = self.callback_handler.on_step_begin(self.args, self.state, self.control)"),
 (f"{_T}/trainer.py", "self._tr_loss += tr_loss_step"),
 (f"{_T}/trainer.py", "if do_sync_step:"),
 (f"{_T}/trainer.py", "grad_norm = self._clip_grad_norm(model)"),
 (f"{_T}/trainer.py", "self.control = self.callback_handler.on_pre_optimizer_step(self.args, self.state, self.control)"),
 (f"{_T}/trainer.py", "self.optimizer.step()"),
 (f"{_T}/trainer.py", "self.control = self.callback_handler.on_optimizer_step(self.args, self.state, self.control)"),
 (f"{_T}/trainer.py", "learning_rate = self._get_learning_rate()"),
 (f"{_T}/trainer.py", "self.lr_scheduler.step()"),
 (f"{_T}/trainer.py", "model.zero_grad()" + NEXT_LINE + "self.state.global_step += 1"),
 (f"{_T}/trainer.py", "self.control = self.callback_handler.on_step_end(self.args, self.state, self.control)"),
 (f"{_T}/trainer.py", "self.control = self.callback_handler.on_substep_end(self.args, self.state, self.control)"),
 (f"{_T}/trainer.py", "def training_step("),
 (f"{_T}/trainer.py", "model.train()" + NEXT_LINE + "if hasattr(self.optimizer, \"train\") and callable(self.optimizer.train):"),
 (f"{_T}/trainer.py", "with self.compute_loss_context_manager():" + NEXT_LINE + "loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)"),
 (f"{_T}/trainer.py", "loss = loss / self.current_gradient_accumulation_steps"),
 (f"{_T}/trainer.py", "self.accelerator.backward(loss, **kwargs)"),
 (f"{_T}/trainer.py", "def compute_loss("),
 (f"{_T}/trainer.py", "outputs = model(**inputs)" + NEXT_LINE + "" + NEXT_LINE + "# User-defined compute_loss function"),
 (f"{_T}/trainer.py", "def autocast_smart_context_manager("),
 (f"{_T}/trainer.py", "def _maybe_log_save_evaluate("),
 (f"{_T}/trainer.py", "logs[\"loss\"] = tr_loss_scalar / (self.state.global_step - self._globalstep_last_logged)"),
 (f"{_T}/trainer.py", "self.log(logs, start_time)"),
 (f"{_T}/trainer.py", "metrics = self._evaluate(trial, ignore_keys_for_eval)"),
 (f"{_T}/trainer.py", "is_new_best_metric = self._determine_best_metric(metrics=metrics, trial=trial)"),
 (f"{_T}/trainer.py", "self._save_checkpoint(model, trial)"),
 (f"{_T}/trainer.py", "self.control = self.callback_handler.on_save(self.args, self.state, self.control)"),
 (f"{_T}/trainer.py", "def get_batch_samples("),
 (f"{_T}/trainer.py", "def _get_num_items_in_batch("),
 (f"{_T}/trainer.py", "labels_for_count = ["),
 (f"{_T}/trainer.py", "num_items_in_batch = sum(labels.ne(-100).sum() for labels in labels_for_count)"),
 (f"{_T}/trainer.py", "def evaluate("),
 (f"{_T}/trainer.py", "self.log(output.metrics)"),
 (f"{_T}/trainer.py", "self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, output.metrics)"),
 (f"{_T}/trainer.py", "def evaluation_loop("),
 (f"{_T}/trainer.py", "losses = self.gather_function(losses.repeat(batch_size))"),
 (f"{_T}/trainer.py", "metrics[f\"{metric_key_prefix}_loss\"] = losses.mean().item()"),
 (f"{_T}/trainer.py", "def prediction_step("),
 (f"{_T}/trainer.py", "num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)"),
 (f"{_T}/trainer.py", "self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)"),
 (f"{_T}/trainer_callback.py", "class TrainerState:"),
 (f"{_T}/trainer_callback.py", "class TrainerControl(ExportableState):"),
 (f"{_T}/trainer_callback.py", "class TrainerCallback:"),
 (f"{_T}/trainer_callback.py", "class CallbackHandler(TrainerCallback):"),
 (f"{_T}/trainer_callback.py", "class DefaultFlowCallback(TrainerCallback):"),
 (f"{_T}/trainer_pt_utils.py", "def get_length_grouped_indices("),
 (f"{_T}/trainer_pt_utils.py", "return [i for megabatch in megabatches for i in megabatch]"),
]

PROSE_CITATION = re.compile(r"`(?P<file>(?:transformers|accelerate)/[\w/]+\.py)?:(?P<first>\d+)(?:-(?P<last>\d+))?`")


def prose_citations(text: str) -> list[tuple[str, int]]:
    """(file, line) for every line number the text cites outside the citation table (both ends of a
    range). ``:N`` alone refers to the file cited last."""
    lines = text.split("\n")
    start, end = table_span(lines) if any(line.startswith("|---") for line in lines) else (0, 0)
    prose = "\n".join(lines[:start - 2] + lines[end:]) if end else text
    out, current = [], None
    for match in PROSE_CITATION.finditer(prose):
        current = match["file"] or current
        if current is None:
            raise CitationError(f"`:{match['first']}` cites a line before any file is named")
        out += [(current, int(match["first"]))] + ([(current, int(match["last"]))] if match["last"] else [])
    return out


def check_prose(texts: list[str], root: Path) -> list[str]:
    """Errors for every line the texts cite that is not an anchor's line, and for anchors no text cites."""
    errors, anchored = [], {}
    for file, code in prose_anchors:
        try:
            anchored[(file, locate(root / file, code))] = code
        except CitationError as err:
            errors.append(f"{err}; update prose_anchors in {__file__}")
    cited = {c for text in texts for c in prose_citations(text)}
    for file, line in sorted(cited - set(anchored)):
        held = (root / file).read_text(encoding="utf-8").splitlines()[line - 1].strip() if (root / file).exists() else "?"
        errors.append(f"{file}:{line} is cited, but no prose anchor is on that line (it holds {held!r})")
    for file, line in sorted(set(anchored) - cited):
        errors.append(f"prose anchor {file}:{line} ({anchored[(file, line)]!r}) is cited by no doc: remove it")
    return errors


# `module.name` (or `module.Class.attribute`), where module is a minift module: code the text names.
# A config key (`train.seed`) is checked against the config's sections; file names (`loop.py`) are skipped.
_FILE_SUFFIXES = {"py", "md", "json", "jsonl", "toml", "pt", "pth", "bin", "safetensors", "png", "txt"}
_CONFIG_SECTIONS = {"model", "data", "train", "eval", "pairs", "dpo", "reward"}  # [section] key


def _minift_modules() -> set[str]:
    package = REPO / "minift"
    return {p.stem for p in package.glob("*.py") if p.stem != "__init__"} | {"models"}


def minift_names(text: str) -> list[str]:
    modules = _minift_modules() | _CONFIG_SECTIONS
    alternatives = "|".join(sorted(modules))
    pattern = re.compile(rf"(?<![\w./-])(?P<name>(?:{alternatives})(?:\.[A-Za-z_]\w*)+)")
    names = []
    for match in pattern.finditer(text):
        name = match["name"]
        if name.rsplit(".", 1)[-1] not in _FILE_SUFFIXES:
            names.append(name)
    return names


def _config_section(name: str):
    """The ``[name]`` section of minift's configs (a dataclass instance), or None."""
    from minift.config import RunConfig
    from minift.preference.config import PreferenceConfig

    for config in (RunConfig(), PreferenceConfig()):
        if hasattr(config, name):
            return getattr(config, name)
    return None


def _resolves(name: str) -> bool:
    """A config key (``train.seed``), an attribute of minift's model (``model.set_hot_path``),
    or ``module.attribute...`` of the minift package."""
    parts = name.split(".")
    section = _config_section(parts[0]) if parts[0] in _CONFIG_SECTIONS else None
    if section is not None and len(parts) == 2 and hasattr(section, parts[1]):
        return True
    if parts[0] == "model":
        from minift.models.base import CausalLM

        return len(parts) == 2 and hasattr(CausalLM, parts[1])
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("minift." + ".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def unknown_minift_names(text: str) -> list[str]:
    """The minift names (and config keys) the text uses that do not exist."""
    return sorted({name for name in minift_names(text) if not _resolves(name)})


def main(argv: list[str]) -> int:
    root, versions = upstream_root()
    text = DOC.read_text(encoding="utf-8")
    if "--check" in argv:
        texts = [path.read_text(encoding="utf-8") for path in PROSE_DOCS]
        errors = check(text, root) + (check_prose(texts, root) if root else [])
        errors += [f"{path.name}: no minift name {name!r}" for path, body in zip(PROSE_DOCS, texts)
                   for name in unknown_minift_names(body)]
        summary = f"{len(cited(text))} rows and {len(prose_anchors)} prose citations hold, minift names exist"
        print("\n".join(errors) or summary + ("" if root else f"; upstream half not checked: {versions}"))
        return 1 if errors else 0
    if root is None:
        print(f"cannot re-locate the transformers/accelerate half: {versions}", file=sys.stderr)
        return 1
    lines = text.split("\n")
    start, end = table_span(lines)
    DOC.write_text("\n".join(lines[:start] + table_rows(root) + lines[end:]), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
