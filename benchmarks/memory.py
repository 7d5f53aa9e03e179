"""Peak memory and step time of full fine-tuning, LoRA, activation checkpointing and FSDP on one
model and one batch.

    python3 benchmarks/memory.py [--n-layer 12] [--n-embd 256] [--batch 8] [--seq 256] [--steps 3]
                                 [--rounds 1] [--rows full,lora,full+ac,lora+ac,fsdp] [--device cpu]
                                 [--threads 0]

The model is GPT-2-shaped (GPT-2's 50,257-token vocabulary padded to 50,304, random init: the
weights' values change neither memory nor speed), trained as ``minift train`` trains on CPU: fused
LM head, labelled rows only, float32, AdamW. The batch is ``--batch`` rows of ``--seq`` seeded
random tokens, every position labelled. Rows:

``full``      every parameter trains
``lora``      LoRA r=8, alpha=16 on every linear layer (c_attn, c_proj, c_fc); the base frozen
``+ac``       activation checkpointing per block (``CausalLM.set_activation_checkpointing``)
``fsdp``      full fine-tuning sharded over 2 ranks (torchrun, gloo on CPU / NCCL on CUDA; FSDP2 as
              ``train.distributed = "fsdp"`` wraps it: ``minift/fsdp.py``), each rank half of the batch;
              every number is rank 0's: what one rank holds

Each row runs alone in a fresh process (a process's peak resident set only grows); ``--rounds``
repeats the sequence of rows (A B C D A B C D ...) so a loaded machine's drift hits every row alike,
and the medians over the rounds are reported. Reported:

- ``params``, ``grads``, ``adam``: bytes of the weights, of the gradients of what trains, and of
  AdamW's state (exact, from the tensors);
- ``kept``: bytes autograd keeps from the forward for the backward (counted with
  ``torch.autograd.graph.saved_tensors_hooks`` over one forward; checkpointed blocks keep only
  their input, and recompute the rest block by block in backward);
- ``tensor peak``: the most bytes of tensors alive at once during one whole step (forward,
  backward, optimizer; the model and batch included), counted exactly by following every
  tensor torch allocates (``LiveTensorBytes``) — what the step needs, whatever the allocator does;
- ``peak``: the process's peak resident set (CPU: VmHWM) or ``max_memory_allocated`` (CUDA), and
  ``peak - base``: its rise over the resident model and batch before the first step (the
  allocator's caching and fragmentation included: noisier, but what the machine must have);
- ``s/step``: median seconds of ``--steps`` optimizer steps after one warm-up step.

The defaults make activations the largest part of full fine-tuning's memory (2,048 tokens through
12 blocks); smaller batches let the LM head's chunk of logits (1,024 rows x 50,304, 206 MB) or the
weights' gradients and moments set the peak instead.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from minift.distributed import Distributed
from minift.lora import LoraSettings, apply_lora, trainable_parameters
from minift.models import GPT2Config, build_model
from minift.optim import make_adamw
from minift.runtime import high_water_rss, keep_large_allocations

from harness import device_sync

ROWS = ("full", "lora", "full+ac", "lora+ac", "fsdp")
FSDP_RANKS = 2
LORA = LoraSettings(r=8, alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])
MB = 2 ** 20


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (an FSDP shard's local rows; the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def tensor_bytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive now and at most, for the tensors made inside the mode (the
    backward's included) and those given to ``track``. A storage counts once however many
    views share it; it stops counting when torch frees it."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = WeakIdKeyDictionary()

    def track(self, tensor: torch.Tensor) -> None:
        storage = local(tensor).untyped_storage()
        if storage in self.seen:
            return
        self.seen[storage] = nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out


def build(args, row: str):
    config = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_embd // 64,
                        n_positions=args.seq,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = build_model(config).pad_vocab(64).set_hot_path(loss_rows="labelled", fused_head=True)
    if row.startswith("lora"):
        apply_lora(model, LORA, generator=torch.Generator().manual_seed(0))
    model.set_activation_checkpointing(row.endswith("+ac"))
    return model.to(args.device).train()


def measure_row(args, row: str) -> dict:
    """One row, in this process (run it in a fresh one: see the module docstring)."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        keep_large_allocations()  # as minift train does on CPU
    model = build(args, row)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(1)).to(device)
    dist = None
    if row == "fsdp":  # this rank's half of the batch; the model sharded as minift train shards it
        dist = Distributed.from_env()
        device = dist.device
        model.to(device)
        dist.wrap(model, mode="fsdp")
        ids = ids[dist.rank::dist.world_size].to(device)
    optimizer = make_adamw(model, lr=1e-4)
    sync = device_sync(device)
    sync()
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else resident_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    kept = 0

    def count(tensor):
        nonlocal kept
        kept += tensor.numel() * tensor.element_size()
        return tensor

    def step(saved_tensors_hook=None):
        if saved_tensors_hook is None:
            out = model(ids, labels=ids)
        else:
            with torch.autograd.graph.saved_tensors_hooks(saved_tensors_hook, lambda t: t):
                out = model(ids, labels=ids)
        (out.loss_sum / out.n_loss_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    # the warm-up step, counted: tensors the forward saves (hooks) and live tensors (the dispatch mode)
    tensors = LiveTensorBytes()
    for tensor in [*model.parameters(), ids]:
        tensors.track(tensor)
    with tensors:
        step(count)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else high_water_rss()
    trained = trainable_parameters(model)
    if dist is not None:
        dist.shutdown()
        if not dist.is_main:
            return {}
    return {"row": row, "n_params": sum(p.numel() for p in model.parameters()),
            "n_trained": sum(p.numel() for p in trained.values()),
            "params": tensor_bytes(model.parameters()), "grads": tensor_bytes(trained.values()),
            "adam": tensor_bytes(t for state in optimizer.state.values() for t in state.values()
                                 if torch.is_tensor(t)),
            "kept": kept, "tensor_peak": tensors.peak, "base": base, "peak": peak,
            "s_per_step": statistics.median(times),
            "threads": torch.get_num_threads(), "device": str(device),
            "ranks": dist.world_size if dist is not None else 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_of_rounds(runs: list[dict]) -> dict:
    """One row's record: the first run's exact counts, the medians of what was measured."""
    out = dict(runs[0])
    for key in ("base", "peak", "s_per_step"):
        out[key] = statistics.median(r[key] for r in runs)
    out["rounds"] = len(runs)
    return out


def table(results: list[dict], args) -> str:
    first = results[0]
    title = (f"GPT-2 shape n_layer={args.n_layer} n_embd={args.n_embd}, batch {args.batch} x {args.seq} "
             f"tokens, fp32, {first['device']}, {first['threads']} threads, median of {first['rounds']} "
             f"round(s); MiB")
    columns = ("row", "trained params", "params", "grads", "adam", "kept for backward", "tensor peak", "peak",
               "peak - base", "s/step")
    lines = [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        mib = {k: f"{r[k] / MB:.0f}" for k in ("params", "grads", "adam", "kept", "tensor_peak", "peak")}
        name = r["row"] + (f" ({r['ranks']} ranks, per rank)" if r.get("ranks", 1) > 1 else "")
        cells = [name, f"{r['n_trained'] / 1e6:.2f} M of {r['n_params'] / 1e6:.1f} M",
                 *(mib[k] for k in ("params", "grads", "adam", "kept", "tensor_peak", "peak")),
                 f"{(r['peak'] - r['base']) / MB:.0f}", f"{r['s_per_step']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--one-row", help=argparse.SUPPRESS)  # the child process of one row
    args = parser.parse_args()
    if args.one_row:
        record = measure_row(args, args.one_row)
        if record:  # FSDP: rank 0's
            print(json.dumps(record))
        return
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    for round_index in range(args.rounds):
        for row in rows:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(FSDP_RANKS),
                        "--master-port", str(free_port())] if row == "fsdp" else [sys.executable]
            child = subprocess.run([*launcher, __file__, *sys.argv[1:], "--one-row", row],
                                   capture_output=True, text=True, check=False)
            if child.returncode:
                sys.exit(f"row {row} failed (exit status {child.returncode}; -9: killed, e.g. out of "
                         f"memory):\n{child.stderr}")
            runs[row].append(json.loads(child.stdout.strip().splitlines()[-1]))
            seconds = runs[row][-1]["s_per_step"]
            print(f"round {round_index + 1}, {row}: {seconds:.2f} s/step", file=sys.stderr)
    results = [median_of_rounds(runs[row]) for row in rows]
    print(table(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
