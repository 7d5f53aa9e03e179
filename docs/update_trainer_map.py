"""Rewrite the citation table of docs/trainer-map.md: each row names a Trainer behaviour and the
minift code that does it; this finds the line the code is on now.

    python3 docs/update_trainer_map.py

tests/test_docs.py fails when a cited line no longer holds its code: run this after moving code.
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "trainer-map.md"

# (Trainer behaviour, file, code on the cited line, note)
rows = [
 # (Trainer behaviour, file, snippet, note)
 ("`TrainingArguments` fields", "minift/config.py", "class TrainSection:", "one typed dataclass per TOML section; unknown keys and wrong types are errors naming the key"),
 ("`per_device_train_batch_size`", "minift/config.py", "batch_size: int = 8", "sequences per micro-batch"),
 ("`gradient_accumulation_steps`", "minift/config.py", "grad_accum: int = 4", "micro-batches per optimizer step"),
 ("`learning_rate=5e-5`, `lr_scheduler_type=\"linear\"`, `warmup_steps/ratio`", "minift/config.py", "lr: float = 5e-5", "Trainer's defaults are minift's defaults (wd 0, betas 0.9/0.999, eps 1e-8, max_grad_norm 1.0)"),
 ("`DataCollatorForLanguageModeling(mlm=False)`", "minift/collate.py", "class Collator:", "right-pads to the longest sequence, labels = ids with -100 on pads; also returns the counts"),
 ("`padding=\"max_length\"` (the classic recipe)", "minift/collate.py", "length = self.max_length if self.padding == \"max_length\" else longest", "only for comparison"),
 ("`group_by_length` / `LengthGroupedSampler`", "minift/sampling.py", "class LengthGroupedSampler(BatchSampler):", "megabatches sorted by length, longest batch first"),
 ("`train_sampling_strategy=\"sequential\"`", "minift/sampling.py", "class SequentialSampler(BatchSampler):", ""),
 ("the inner training loop (`_inner_training_loop`)", "minift/loop.py", "def train(model, optimizer, scheduler, loader, *, total_steps: int, grad_accum: int = 1,", "one function read top to bottom; logging, evaluation and checkpoints are `Hooks` called at fixed points"),
 ("fetch the accumulation window first (`get_batch_samples`)", "minift/loop.py", "window = next(windows)", "a window never spans two epochs; the last may be short"),
 ("`num_items_in_batch` (loss denominator)", "minift/loop.py", "n_counted = int(dist.reduce_sum(torch.tensor(sum(loss_fn.count(b) for b in window), device=device)))", "counted before the first backward, summed over ranks"),
 ("`ForCausalLMLoss(reduction=\"sum\") / num_items_in_batch`", "minift/loop.py", "scaler.scale(out.loss_sum / denominator).backward()", "the model returns the summed CE (`lm_loss_sum`)"),
 ("shifted next-token CE, `ignore_index=-100`", "minift/models/lm_loss.py", "targets = labels[:, 1:]", "only labelled rows reach the LM head on CPU; every row, masked, on the static path"),
 ("`accelerator.backward(loss)` with `no_sync` under DDP", "minift/loop.py", "scaler.scale(out.loss_sum / denominator).backward()", ""),
 ("`clip_grad_norm_(model.parameters(), max_grad_norm)`; logged `grad_norm` is pre-clip", "minift/loop.py", "grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)", ""),
 ("`optimizer.step()`; skipped under fp16 overflow", "minift/loop.py", "scaler.step(optimizer)", "GradScaler skips and lowers the scale; counted in `skipped_overflow`"),
 ("`lr_scheduler.step()` (not after a skipped fp16 step)", "minift/loop.py", "scheduler.step()", ""),
 ("`model.zero_grad()`", "minift/loop.py", "optimizer.zero_grad(set_to_none=True)", ""),
 ("`get_decay_parameter_names` (no decay for biases and LayerNorm)", "minift/optim.py", "def decay_parameter_names(model: nn.Module) -> list[str]:", "tied head counted once"),
 ("`optim=\"adamw_torch_fused\"`", "minift/optim.py", "return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=use_fused or None,", "fused where supported (CPU too)"),
 ("`get_linear/cosine/constant_schedule_with_warmup`", "minift/optim.py", "def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):", ""),
 ("`warmup_ratio` → `math.ceil(ratio * total)`", "minift/optim.py", "return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)", ""),
 ("`fp16=True` / `bf16=True` (autocast + GradScaler)", "minift/precision.py", "return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)", "one `Precision` object owns autocast and the scaler (fp16 only)"),
 ("checkpoint contents (`model`, `optimizer.pt`, `scheduler.pt`, `rng_state.pth`, `trainer_state.json`)", "minift/checkpoint.py", "training_state = {\"optimizer\": parts.optimizer.state_dict(), \"scheduler\": parts.scheduler.state_dict(),", "one `training_state.pt` plus the model in the transformers layout and a checksummed manifest"),
 ("`save_total_limit`", "minift/checkpoint.py", "def prune_checkpoints(output_dir: Path, keep: int) -> None:", "only after the new checkpoint is complete"),
 ("`resume_from_checkpoint`", "minift/finetune.py", "if resume and (path := ckpt.checkpoint_to_resume(resume, out_dir, log=say)):", "weights, optimizer, scheduler, scaler, sampler position, RNG: bit-identical on CPU"),
 ("skipping already-seen batches on resume", "minift/sampling.py", "yield from self.batches(self.epoch)[self.consumed:]", "no replay of the data loader: the sampler starts at the next batch"),
 ("`evaluate()` (eval loss)", "minift/evaluate.py", "def loss_sums(model, batches: Iterable[dict], device, autocast=None) -> tuple[float, int]:", "token-weighted"),
 ("`resize_token_embeddings` after adding `[PAD]`", "minift/models/base.py", "def resize_token_embeddings(self, new_vocab_size: int) -> None:", "new rows = mean of old rows (transformers 5.x samples around the mean instead)"),
 ("`logging_steps` / `log_history`", "minift/metrics.py", "class MetricsLogger:", "`metrics.jsonl`, one line per optimizer step"),
]


def table_rows() -> list[str]:
    out = []
    for what, file, snippet, note in rows:
        lines = (REPO / file).read_text().splitlines()
        hits = [i + 1 for i, line in enumerate(lines) if snippet in line]
        if not hits:
            raise SystemExit(f"{file}: no line holds {snippet!r}; update the row in {__file__}")
        out.append(f"| {what} | `{file}:{hits[0]}` | `{snippet.replace('|', chr(92) + '|')}` | {note} |")
    return out


def main() -> None:
    lines = DOC.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("|---"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("| "))
    DOC.write_text("\n".join(lines[:start + 1] + table_rows() + lines[end:]))


if __name__ == "__main__":
    main()
