"""The citation table of docs/trainer-map.md: each row names a Trainer behaviour, the transformers
(or accelerate) code that does it and the minift code that does the same job. Both sides are cited
as ``file:line`` plus the code on that line; the code is what finds the line again after it moves.

    python3 docs/update_trainer_map.py          # rewrite the line numbers
    python3 docs/update_trainer_map.py --check  # what tests/test_docs.py runs

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
PINS = {"transformers": "5.24.0", "accelerate": "1.15.0"}
NEXT_LINE = " ⏎ "  # joins the parts of a citation that spans consecutive lines

_T, _A = "transformers", "accelerate"
# (Trainer behaviour, upstream file, upstream code, minift file, minift code, note: why minift differs)
rows = [
 ("`TrainingArguments` fields", f"{_T}/training_args.py", "class TrainingArguments:", "minift/config.py", "class TrainSection:", "one typed dataclass per TOML section; unknown keys and wrong types are errors naming the key"),
 ("`per_device_train_batch_size` = 8", f"{_T}/training_args.py", "per_device_train_batch_size: int = field(default=8", "minift/config.py", "batch_size: int = option(8,", "same default"),
 ("`gradient_accumulation_steps` = 1", f"{_T}/training_args.py", "gradient_accumulation_steps: int = field(", "minift/config.py", "grad_accum: int = option(4,", "**differs**: minift's recipe steps on 8 × 4 = 32 sequences, the classic recipe's accumulation of 4; `compat = \"trainer\"` defaults to 1"),
 ("`learning_rate` = 5e-5 (and wd 0, betas 0.9/0.999, eps 1e-8, `max_grad_norm` 1.0)", f"{_T}/training_args.py", "learning_rate: float = field(default=5e-5", "minift/config.py", "lr: float = option(5e-5,", "same defaults"),
 ("`seed` = 42", f"{_T}/training_args.py", "seed: int = field(default=42", "minift/config.py", "seed: int = option(0,", "**differs**: any fixed seed reproduces; minift's is 0; `compat = \"trainer\"` defaults to 42"),
 ("`num_train_epochs` = 3", f"{_T}/training_args.py", "num_train_epochs: float = field(default=3.0", "minift/config.py", "epochs: float = option(1.0,", "**differs**: one pass over the 27k tweets is minift's recipe; `compat = \"trainer\"` defaults to 3"),
 ("`warmup_steps` < 1 is a ratio of the total steps", f"{_T}/training_args.py", "int(self.warmup_steps) if self.warmup_steps >= 1 else math.ceil(num_training_steps * self.warmup_steps)", "minift/optim.py", "return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)", "**differs**: two typed keys (`warmup_steps` int, `warmup_ratio`), so 0.5 steps is an error, not a silent ratio; `compat = \"trainer\"` reads `warmup_steps < 1` as the ratio (`resolve_compat`)"),
 ("`logging_steps` = 500", f"{_T}/training_args.py", "logging_steps: float = field(", "minift/config.py", "log_every: int = option(1,", "**differs**: a JSON line per step is cheap and plots the whole curve; `compat = \"trainer\"` defaults to 500"),
 ("`per_device_eval_batch_size` = 8", f"{_T}/training_args.py", "per_device_eval_batch_size: int = field(", "minift/config.py", "batch_size: int = option(32,", "**differs**: evaluation keeps no activations for backward, so 4× the training batch fits; `compat = \"trainer\"` defaults to 8"),
 ("`train_sampling_strategy` = \"random\"", f"{_T}/training_args.py", "train_sampling_strategy: str = field(", "minift/config.py", "sampler: str = option(\"length_grouped\",", "**differs**: with dynamic padding, length grouping lifts padding efficiency from 0.50 (random batches of 32) to 0.97 on the train tweets (`python3 benchmarks/padding.py`); `compat = \"trainer\"` defaults to random"),
 ("Trainer's defaults, applied by `train.compat = \"trainer\"`", f"{_T}/training_args.py", "class TrainingArguments:", "minift/config.py", "def resolve_compat(raw: dict[str, Any]) -> dict[str, Any]:", "fills only keys the TOML and `--set` did not give"),
 ("`set_seed(seed)`", f"{_T}/trainer_utils.py", "def set_seed(", "minift/runtime.py", "def seed_everything(seed: int) -> None:", "python, numpy and torch RNGs"),
 ("`DataCollatorForLanguageModeling(mlm=False)`", f"{_T}/data/data_collator.py", "class DataCollatorForLanguageModeling(", "minift/collate.py", "class Collator:", "right-pads to the longest sequence; **differs**: labels are masked where `attention_mask` is 0, not where the id equals the pad id (GPT-2 pads with EOS, and Trainer's collator masks a real EOS too); also returns the counts"),
 ("`group_by_length`: megabatches of a whole optimizer step", f"{_T}/trainer.py", "self.args.train_batch_size * self.args.gradient_accumulation_steps,", "minift/sampling.py", "order = trainer_length_grouped_indices(self.lengths, self.batch_size * self.grad_accum, generator)", "`compat = \"trainer\"`: `TrainerLengthGroupedSampler`, cut into micro-batches afterwards as Trainer's DataLoader does"),
 ("megabatch multiplier `min(n // (4·bs), 50)`", f"{_T}/trainer_pt_utils.py", "mega_batch_mult = min(len(lengths) // (batch_size * 4), 50)", "minift/sampling.py", "multiplier = min(len(lengths) // (batch_size * 4), 50) or 1", "`compat = \"trainer\"`"),
 ("the longest example swapped to the front", f"{_T}/trainer_pt_utils.py", "megabatches[0][0], megabatches[max_idx][0] = megabatches[max_idx][0], megabatches[0][0]", "minift/sampling.py", "megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]", "`compat = \"trainer\"`"),
 ("`get_length_grouped_indices` (Trainer's grouping)", f"{_T}/trainer_pt_utils.py", "def get_length_grouped_indices(", "minift/sampling.py", "class LengthGroupedSampler(BatchSampler):", "**differs** (minift's default): megabatches of 50 micro-batches, then the batches shuffled with the longest batch first. Trainer keeps each megabatch in order, so lengths fall from longest to shortest within every megabatch and a run's loss curve shows that sawtooth; minift's shuffled batches do not trend"),
 ("group_by_length draws from torch's global RNG", f"{_T}/trainer_pt_utils.py", "indices = torch.randperm(len(lengths), generator=generator)", "minift/sampling.py", "def _draw_loader_base_seed(generator: torch.Generator) -> None:", "`compat = \"trainer\"` replays that stream (the DataLoader's base-seed draw, then the permutation), so epochs after the first match only while nothing else drew from the global RNG (dropout 0, no evaluation mid-epoch); minift's own samplers have their own generator and never depend on dropout"),
 ("random order: accelerate's `SeedableRandomSampler`, seed + epoch", f"{_A}/data_loader.py", "seed = self.epoch + self.initial_seed", "minift/sampling.py", "generator = torch.Generator().manual_seed(self.seed + epoch)", "`compat = \"trainer\"`: `TrainerRandomSampler`"),
 ("Trainer's `RandomSampler` becomes seedable", f"{_A}/data_loader.py", "if isinstance(sampler, RandomSampler) and use_seedable_sampler:", "minift/sampling.py", "generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)", "**differs** (minift's default): with seed + epoch, seed s in epoch 1 replays seed s + 1 in epoch 0; spreading the seeds keeps runs with neighbouring seeds apart"),
 ("`train_sampling_strategy=\"sequential\"`", f"{_T}/trainer.py", "return SequentialSampler(train_dataset)", "minift/sampling.py", "class SequentialSampler(BatchSampler):", ""),
 ("the inner training loop (`_inner_training_loop`)", f"{_T}/trainer.py", "def _inner_training_loop(", "minift/loop.py", "def train(", "one function read top to bottom; logging, evaluation and checkpoints are `Hooks` called at fixed points"),
 ("fetch the accumulation window first (`get_batch_samples`)", f"{_T}/trainer.py", "batch_samples, num_items_in_batch = self.get_batch_samples(epoch_iterator, num_batches, self.args.device)", "minift/loop.py", "window = next(windows)", "a window never spans two epochs; the last may be short"),
 ("`num_items_in_batch` (loss denominator)", f"{_T}/trainer.py", "num_items_in_batch = sum(labels.ne(-100).sum() for labels in labels_for_count)", "minift/loop.py", "n_counted = sum(loss_fn.count(b) for b in window)", "counted before the first backward, summed over ranks"),
 ("unshifted count for `loss_type` None (GPT-1 and GPT-2)", f"{_T}/trainer.py", "self._loss_shifts_labels = LOSS_MAPPING.get(", "minift/finetune.py", "loss_denominator == \"trainer\" else \"n_loss_targets\"", "**differs**: minift divides by the next-token targets, so the loss is the mean CE per target and exp(loss) a perplexity; Trainer also counts each sequence's first token; `loss_denominator = \"trainer\"` (implied by `compat = \"trainer\"`) uses Trainer's count"),
 ("`ForCausalLMLoss(reduction=\"sum\") / num_items_in_batch`", f"{_T}/loss/loss_utils.py", "loss = loss / num_items_in_batch", "minift/loop.py", "out.loss_sum / denominator", "the model returns the summed CE (`lm_loss_sum`)"),
 ("shifted next-token CE, `ignore_index=-100`", f"{_T}/loss/loss_utils.py", "def ForCausalLMLoss(", "minift/models/lm_loss.py", "targets = labels[:, 1:]" + NEXT_LINE + "if rows == \"labelled\":", "only labelled rows reach the LM head (`lm_loss_sum_all_positions` is Trainer's way, for comparison)"),
 ("`accelerator.backward(loss)` with `no_sync` under DDP", f"{_T}/trainer.py", "self.accelerator.backward(loss, **kwargs)", "minift/loop.py", "scaler.scale(", ""),
 ("the step's logged loss: sum of the micro-batch losses", f"{_T}/trainer.py", "self._tr_loss += tr_loss_step", "minift/loop.py", "loss_sum += out.loss_sum.detach()", "minift sums in float64 and divides once; Trainer adds float32 quotients (differences ~1e-7)"),
 ("`clip_grad_norm_(model.parameters(), max_grad_norm)`; logged `grad_norm` is pre-clip", f"{_T}/trainer.py", "grad_norm = self._clip_grad_norm(model)", "minift/loop.py", "grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)", ""),
 ("`optimizer.step()`; skipped under fp16 overflow", f"{_T}/trainer.py", "self.optimizer.step()", "minift/loop.py", "scaler.step(optimizer)", "GradScaler skips and lowers the scale; counted in `skipped_overflow`"),
 ("logged `learning_rate`: the rate this step used", f"{_T}/trainer.py", "learning_rate = self._get_learning_rate()", "minift/loop.py", "lr = optimizer.param_groups[0][\"lr\"]", "read before the scheduler steps, as Trainer"),
 ("`lr_scheduler.step()` (not after a skipped fp16 step)", f"{_T}/trainer.py", "self.lr_scheduler.step()", "minift/loop.py", "scheduler.step()", ""),
 ("`model.zero_grad()` after every optimizer step", f"{_T}/trainer.py", "model.zero_grad()" + NEXT_LINE + "self.state.global_step += 1", "minift/loop.py", "scheduler.step()" + NEXT_LINE + "optimizer.zero_grad(set_to_none=True)", "the per-step call, right after the scheduler (the other `zero_grad` in `loop.py` drops a non-finite step's gradients)"),
 ("`logging_steps` = N logs the mean loss of the N steps", f"{_T}/trainer.py", "logs[\"loss\"] = tr_loss_scalar / (self.state.global_step - self._globalstep_last_logged)", "minift/metrics.py", "return {**record, \"loss\": sum(losses) / len(losses), \"step_loss\": record[\"loss\"]}", "**differs** (minift's default): a written record is one step's own numbers (its loss, lr, grad-norm and tokens belong together); `compat = \"trainer\"` writes the window's mean loss and keeps the step's in `step_loss`"),
 ("`log_history`", f"{_T}/trainer.py", "self.state.log_history.append(output)", "minift/metrics.py", "class MetricsLogger:", "`metrics.jsonl`, one line per logged step"),
 ("`get_decay_parameter_names` (no decay for biases and LayerNorm)", f"{_T}/trainer.py", "def get_decay_parameter_names(", "minift/optim.py", "def decay_parameter_names(model: nn.Module) -> list[str]:", "tied head counted once"),
 ("the optimizer holds only parameters that require a gradient (a base frozen under peft)", f"{_T}/trainer.py", "p for n, p in opt_model.named_parameters() if (n in decay_parameters and p.requires_grad)", "minift/optim.py", "params = {name: p for name, p in model.named_parameters() if p.requires_grad}", "same: with a LoRA adapter (`minift.lora`) only the adapter's parameters"),
 ("`optim=\"adamw_torch_fused\"` (the default with torch ≥ 2.8)", f"{_T}/training_args.py", "default_optim = \"adamw_torch_fused\"", "minift/optim.py", "return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=use_fused or None,", "fused where supported (CPU too)"),
 ("`get_scheduler` (linear/cosine/constant with warmup)", f"{_T}/optimization.py", "def get_scheduler(", "minift/optim.py", "def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):", ""),
 ("`fp16=True` / `bf16=True` (autocast + GradScaler)", f"{_A}/accelerator.py", "def autocast(self, autocast_handler: AutocastKwargs = None):", "minift/precision.py", "return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)", "one `Precision` object owns autocast and the scaler (fp16 only)"),
 ("checkpoint contents (`model`, `optimizer.pt`, `scheduler.pt`, `rng_state.pth`, `trainer_state.json`)", f"{_T}/trainer.py", "def _save_checkpoint(", "minift/checkpoint.py", "training_state = {\"optimizer\": parts.optimizer.state_dict(), \"scheduler\": parts.scheduler.state_dict(),", "one `training_state.pt` plus the model in the transformers layout and a checksummed manifest"),
 ("`save_total_limit`", f"{_T}/trainer_utils.py", "def rotate_checkpoints(", "minift/checkpoint.py", "def prune_checkpoints(output_dir: Path, keep: int, log: Callable[[str], None] = print) -> None:", "only after the new checkpoint is complete, counting only verified checkpoints"),
 ("`resume_from_checkpoint`", f"{_T}/trainer.py", "self._load_from_checkpoint(resume_from_checkpoint)", "minift/finetune.py", "resumed = ckpt.resume_training(resume, out_dir, state, parts, dist, cfg.to_dict(), fingerprints,", "weights, optimizer, scheduler, scaler, sampler position, RNG: bit-identical on CPU; refuses changed settings unless --resume-with-changes"),
 ("skipping already-seen batches on resume", f"{_T}/trainer.py", "train_dataloader = skip_first_batches(train_dataloader, steps_trained_in_current_epoch)", "minift/sampling.py", "yield from self.batches(self.epoch)[self.consumed:]", "**differs**: no replay of the data loader; the sampler starts at the next batch, so resuming costs no data loading"),
 ("`evaluation_loop`", f"{_T}/trainer.py", "def evaluation_loop(", "minift/evaluate.py", "def evaluate(model, ", ""),
 ("eval: each batch divided by its own count", f"{_T}/trainer.py", "num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)", "minift/evaluate.py", "def trainer_eval_loss(", "`compat = \"trainer\"`"),
 ("eval: batch losses repeated once per sequence, then averaged", f"{_T}/trainer.py", "losses = self.gather_function(losses.repeat(batch_size))", "minift/evaluate.py", "return sum(total / max(1, count) * n for total, count, n in per_batch) / max(1, sequences)", "`compat = \"trainer\"` (accelerate cuts the last batch's copies to its real size)"),
 ("`eval_loss` = mean over sequences", f"{_T}/trainer.py", "metrics[f\"{metric_key_prefix}_loss\"] = losses.mean().item()", "minift/evaluate.py", "loss = loss_sum / max(1, n_targets)", "**differs** (minift's default): the whole set's CE over its next-token targets does not depend on how the set is batched or ordered, and exp(loss) is its perplexity; Trainer's weighs a short tweet's tokens more than a long one's"),
 ("eval batches under group_by_length: own generator seeded `seed`", f"{_T}/trainer.py", "generator=torch.Generator().manual_seed(", "minift/sampling.py", "order = trainer_length_grouped_indices(lengths, batch_size, torch.Generator().manual_seed(seed))", "`compat = \"trainer\"`; otherwise dataset order, as Trainer"),
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


def upstream_root() -> tuple[Path | None, str]:
    """site-packages holding the pinned transformers and accelerate, or None and why not."""
    roots = []
    for name, pin in PINS.items():
        try:
            module = importlib.import_module(name)
        except ImportError:
            return None, f"{name} is not installed"
        if module.__version__ != pin:
            return None, f"{name} {module.__version__} is installed, the map cites {pin}"
        roots.append(Path(module.__file__).resolve().parents[1])
    return roots[0], f"transformers {PINS['transformers']}, accelerate {PINS['accelerate']}"


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


CITATION = re.compile(r"^\| (?P<what>.+?) \| `(?P<ufile>(?:transformers|accelerate)/[\w/]+\.py):(?P<uline>\d+)` \| "
                      r"`(?P<ucode>.+?)` \| `(?P<mfile>minift/[\w/]+\.py):(?P<mline>\d+)` \| `(?P<mcode>.+?)` \| ")


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


def main(argv: list[str]) -> int:
    root, versions = upstream_root()
    text = DOC.read_text(encoding="utf-8")
    if "--check" in argv:
        errors = check(text, root)
        summary = f"{len(cited(text))} rows: citations hold"
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
