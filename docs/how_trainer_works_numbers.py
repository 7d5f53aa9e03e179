"""The numbers of docs/how-trainer-works.md, measured: Trainer and minift side by side
(benchmarks/trainer_side_by_side.py, both samplings, optimizer step 2 stage by stage), the weight-decay
groups, and the order of Trainer's callback events in one step.

    python3 docs/how_trainer_works_numbers.py           # measure, print as JSON
    python3 docs/how_trainer_works_numbers.py --check   # measure, compare with the doc
    python3 docs/how_trainer_works_numbers.py --write   # measure, write them into the doc and the snapshot

The doc holds its measured numbers in blocks ``<!-- numbers:NAME -->`` … ``<!-- /numbers -->``. ``expected``
says, for each block, every number it holds, in order; a block holding another number, one too few, or one
that differs is an error, so the text cannot drift from what the code does. Measured floats are compared to
the digits the doc prints (or 5e-6, float32 rounding between machines); a difference between Trainer and
minift is printed as a bound ("≤ 5e-6") that the measurement must not exceed. ``--write`` also stores the
measurement in tests/data/how_trainer_works_numbers.json, which tests/test_docs.py compares with the doc on
machines without transformers; with transformers, a slow test measures afresh.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "how-trainer-works.md"
SNAPSHOT = REPO / "tests" / "data" / "how_trainer_works_numbers.json"
TEST_SOURCE = REPO / "tests" / "test_trainer_compat.py"
STEP = 2  # the optimizer step the doc walks through
SAMPLINGS = ("random", "group_by_length")
CLOSE = 5e-6  # measured floats: float32 rounding differs between machines and thread counts
BOUND_MARGIN = 3  # a printed bound is this many times the measured difference, rounded up
# a short Trainer run whose last step logs, evaluates and saves: the callback events of one such step
EVENT_RUN = {"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
             "logging_steps": 1, "eval_steps": 2, "save_steps": 2}


# -- measuring (transformers needed) -----------------------------------------------------------------------
def side_by_side():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import trainer_side_by_side
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return trainer_side_by_side


def measure_sampling(sbs, args, sampling: str) -> dict:
    """Both runs of one sampling strategy: logged rows, Trainer's micro-steps, minift's step STEP
    from its parts, eval losses, the largest differences."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = sbs.minift_settings(args, sampling, str(Path(tmp) / "minift"))
        theirs = sbs.run_trainer(args, sampling, settings, str(Path(tmp) / "trainer"))
        mine = sbs.run_minift(settings)
        stages = sbs.minift_stage_numbers(settings, STEP)
    shared = sorted(set(theirs.weights) & set(mine.weights))
    pairs = list(zip(theirs.logged, mine.logged))
    return {
        "trainer_logged": [list(row) for row in theirs.logged],
        "minift_logged": [list(row) for row in mine.logged],
        "trainer_micro_steps": [[step, list(shape), n, loss] for step, shape, n, loss in theirs.micro_steps],
        "minift_stage": stages,
        "eval": {"trainer": theirs.eval_loss, "minift": mine.eval_loss,
                 "minift_own": mine.eval_loss_per_target},
        "diff": {"loss": max(abs(a[1] - b[1]) for a, b in pairs),
                 "lr": max(abs(a[2] - b[2]) for a, b in pairs),
                 "grad_norm": max(abs(a[3] - b[3]) / a[3] for a, b in pairs),
                 "eval_loss": abs(theirs.eval_loss - mine.eval_loss),
                 "weights": max(float((theirs.weights[k] - mine.weights[k]).abs().max()) for k in shared),
                 "weight_tensors": len(shared)},
    }


def trainer_events(sbs, args) -> dict:
    """Every callback event of a short Trainer run that logs, evaluates and saves at its last step,
    with the step it came at; and the sizes of Trainer's two parameter groups."""
    import transformers

    events = []

    class Recorder(transformers.TrainerCallback):
        pass

    def recorder(name):
        return lambda self, args, state, control, **kwargs: events.append((name, state.global_step))

    for name in dir(transformers.TrainerCallback):
        if name.startswith("on_"):
            setattr(Recorder, name, recorder(name))
    fixture = sbs.shared_dir() / "fixtures" / args.model
    with tempfile.TemporaryDirectory() as tmp:
        settings = sbs.minift_settings(args, "random", str(Path(tmp) / "minift"))
        train, evaluation = sbs.trainer_examples(settings)
        tok = transformers.AutoTokenizer.from_pretrained(str(fixture))
        model = transformers.AutoModelForCausalLM.from_pretrained(str(fixture))
        training_args = transformers.TrainingArguments(
            output_dir=str(Path(tmp) / "trainer"), eval_strategy="steps", save_strategy="steps",
            report_to="none", per_device_eval_batch_size=args.eval_batch_size, disable_tqdm=True,
            use_cpu=True, **EVENT_RUN)
        collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
        trainer = transformers.Trainer(model=model, args=training_args, train_dataset=train,
                                       eval_dataset=evaluation.select(range(args.eval_batch_size)),
                                       data_collator=collator, callbacks=[Recorder()])
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
    groups = [len(group["params"]) for group in trainer.optimizer.param_groups]
    return {"events": events, "trainer_groups": groups, "n_tensors": len(list(model.parameters())),
            "max_grad_norm": training_args.max_grad_norm}  # the default, as in the side-by-side


def minift_groups(sbs, args) -> list[int]:
    """The sizes of minift's two AdamW parameter groups (decay, no decay) on the same model."""
    import torch

    from minift import components

    with tempfile.TemporaryDirectory() as tmp:
        settings = sbs.minift_settings(args, "random", str(Path(tmp) / "minift"))
        cfg, tokenizer, _, _ = sbs.minift_data(settings)
        model = components.build_model(cfg, tokenizer, torch.device("cpu"))
    return [len(group["params"]) for group in components.build_optimizer(cfg, model).param_groups]


def measure() -> dict:
    """Everything the doc quotes, from fresh runs (about 30 s on two CPU cores)."""
    sbs = side_by_side()
    args = sbs.parse_args([])
    sbs.quiet_libraries()
    dropouts = set(sbs.minift_settings(args, "random", "")["model"]["config"].values())  # both sides' model
    assert len(dropouts) == 1, dropouts
    measured = {"settings": vars(args), "step": STEP, "dropout": dropouts.pop()}
    for sampling in SAMPLINGS:
        measured[sampling] = measure_sampling(sbs, args, sampling)
    measured.update(trainer_events(sbs, args))
    measured["minift_groups"] = minift_groups(sbs, args)
    return measured


# -- what the doc must say -----------------------------------------------------------------------------------
@dataclass
class Number:
    """One number of a block: ``exact`` (ints, settings), ``close`` (a measured float), ``bound``
    (the doc's number is an upper bound of the measured one)."""

    value: float
    kind: str = "exact"
    fmt: str = "g"

    def text(self) -> str:
        if self.kind == "bound":
            return _bound(self.value)
        if self.fmt == "e":  # 0.001 -> 1e-3
            mantissa, exponent = f"{self.value:.0e}".split("e")
            return f"{mantissa}e{int(exponent)}"
        return format(self.value, self.fmt)

    def error(self, printed: str) -> str | None:
        shown = float(printed)
        if self.kind == "exact" and shown != self.value:
            return f"{printed} should be {self.text()}"
        if self.kind == "close":
            decimals = len(printed.split(".")[1]) if "." in printed else 0
            if abs(shown - self.value) > max(0.5 * 10**-decimals, CLOSE):
                return f"{printed} should be {self.text()} (measured {self.value!r})"
        if self.kind == "bound" and self.value > shown:
            return f"the bound {printed} is below the measured {self.value:.2e}"
        return None


def _bound(value: float) -> str:
    """BOUND_MARGIN × value rounded up to 1, 2 or 5 times a power of ten ("0" for exactly 0)."""
    if value == 0:
        return "0"
    target = value * BOUND_MARGIN
    exponent = math.floor(math.log10(target))
    mantissa = next(m for m in (1, 2, 5, 10) if m * 10**exponent >= target * (1 - 1e-12))
    return f"{mantissa}e{exponent}" if mantissa < 10 else f"1e{exponent + 1}"


def _ints(values) -> list[Number]:
    return [Number(v) for v in values]


def _floats(values, fmt: str = ".7f") -> list[Number]:
    return [Number(v, "close", fmt) for v in values]


def compat_test_tolerances() -> list[Number]:
    """The tolerances tests/test_trainer_compat.py asserts, read from its source."""
    source = TEST_SOURCE.read_text(encoding="utf-8")
    return [Number(float(re.search(rf'r\["{key}"\] <= ([\d.e-]+)', source)[1]), fmt="e")
            for key in ("loss", "eval_loss", "weights")]


def _step_rows(m: dict, sampling: str = "random", step: int = STEP) -> list[list]:
    """Trainer's ``training_step`` records (step, shape, num_items_in_batch, loss) of one optimizer step."""
    return [row for row in m[sampling]["trainer_micro_steps"] if row[0] == step]


def _step_loss(m: dict, step: int) -> float:
    return sum(row[3] for row in _step_rows(m, step=step))


def _flat(nested) -> list:
    return [x for inner in nested for x in inner]


def run_settings(m: dict) -> list[Number]:
    s = m["settings"]
    return [*_ints([m["dropout"], s["rows"], s["seed"], s["steps"], s["batch_size"], s["grad_accum"]]),
            Number(s["lr"], fmt="e"), *_ints([s["warmup"], s["weight_decay"], s["log_every"], s["eval_rows"],
                                              s["eval_batch_size"], STEP])]


def random_window(m: dict) -> list[Number]:
    stage, rows = m["random"]["minift_stage"], _step_rows(m)
    gap = max(abs(row[3] - loss) for row, (_, loss) in zip(rows, stage["micro_losses"]))
    return _ints([m["settings"]["seed"], 0, STEP, *_flat(stage["window"]), *_flat(stage["lengths"]),
                  *_flat(row[1] for row in rows)]) + [Number(gap, "bound")]


def grouped_window(m: dict) -> list[Number]:
    s, stage = m["settings"], m["group_by_length"]["minift_stage"]
    step_size = s["batch_size"] * s["grad_accum"]  # Trainer's LengthGroupedSampler batch: a whole step
    megabatch = min(s["rows"] // (4 * step_size), 50)  # get_length_grouped_indices' mega_batch_mult
    return _ints([s["rows"], 4, step_size, 50, megabatch, STEP,
                  *_flat(stage["window"]), *_flat(stage["lengths"])])


def micro_losses(m: dict) -> list[Number]:
    first, second = _step_rows(m)  # [step, shape, num_items_in_batch, loss] each
    mine = [loss for _, loss in m["random"]["minift_stage"]["micro_losses"]]
    return [*_ints([*first[1], first[2]]), *_floats([first[3]]), *_ints(second[1]),
            *_floats([second[3], *mine, _step_loss(m, STEP)])]


def clipping(m: dict) -> list[Number]:
    s, trainer = m["settings"], m["random"]["trainer_logged"][0]  # step, loss, lr, grad_norm
    lr = Number(trainer[2], fmt="e")
    return [*_floats([trainer[3], m["random"]["minift_stage"]["grad_norm"]]),
            Number(m["max_grad_norm"], fmt=".1f"), lr, Number(s["warmup"]), Number(0), lr,
            Number(s["lr"], fmt="e"), Number(1), Number(0)]


def logged_loss(m: dict) -> list[Number]:
    first, second = _step_loss(m, 1), _step_loss(m, STEP)
    trainer, mine = m["random"]["trainer_logged"][0][1], m["random"]["minift_logged"][0][1]
    return [*_floats([first]), Number(1), *_floats([second]), Number(STEP), *_floats([(first + second) / 2]),
            Number(STEP), *_floats([trainer, mine])]


def eval_losses(m: dict) -> list[Number]:
    s, losses = m["settings"], m["random"]["eval"]
    return [*_ints([s["steps"], s["eval_rows"], s["eval_batch_size"]]),
            *_floats([losses["trainer"], losses["minift"], losses["minift_own"]]),
            Number(losses["minift_own"] - losses["trainer"], "close", ".2f")]


def whole_run(m: dict) -> list[Number]:
    """The table: the logged steps, then per row both samplings' largest differences (the weights row
    also names the tensor count), then the bound's margin."""
    out = _ints(row[0] for row in m["random"]["trainer_logged"])
    for key in ("loss", "lr", "grad_norm", "eval_loss", "weights"):
        if key == "weights":
            out.append(Number(m["random"]["diff"]["weight_tensors"]))
        kind = "exact" if key == "lr" else "bound"
        out += [Number(m[sampling]["diff"][key], kind) for sampling in SAMPLINGS]
    return out + [Number(BOUND_MARGIN)]


def expected(m: dict) -> dict[str, list[Number]]:
    """Block name -> its numbers, in the order the doc prints them."""
    run = EVENT_RUN
    return {
        "settings": run_settings(m),
        "sampler-random": random_window(m),
        "sampler-grouped": grouped_window(m),
        "count": _ints([_step_rows(m)[0][2], m["random"]["minift_stage"]["n_targets"],
                        m["random"]["minift_stage"]["first_tokens"]]),
        "losses": micro_losses(m),
        "decay": _ints([m["trainer_groups"][0], m["n_tensors"], m["trainer_groups"][1]]),
        "clip": clipping(m),
        "logged": logged_loss(m),
        "eval": eval_losses(m),
        "events": _ints([run["max_steps"], run["per_device_train_batch_size"],
                         run["gradient_accumulation_steps"], run["logging_steps"], run["eval_steps"],
                         run["save_steps"], run["max_steps"]]),
        "whole-run": whole_run(m),
        "test-bounds": compat_test_tolerances(),
    }


def expected_events(m: dict) -> list[str]:
    """The events the doc lists: those of the run's last step, from its ``on_step_begin`` to ``on_save``."""
    names = [name for name, _ in m["events"]]
    start = len(names) - 1 - names[::-1].index("on_step_begin")  # the last step's
    return names[start:names.index("on_save", start) + 1]


def claims(m: dict) -> list[str]:
    """What the doc says holds "on both sides", checked; the ones that no longer hold."""
    rand, stage, rows = m["random"], m["random"]["minift_stage"], _step_rows(m)
    checks = [
        (all(r[2] == stage["n_items"] for r in rows), "Trainer's num_items_in_batch equals minift's count"),
        ([r[1] for r in rows] == [shape for shape, _ in stage["micro_losses"]], "the shapes agree"),
        (stage["n_items"] == stage["n_targets"] + stage["first_tokens"], "N = targets + first tokens"),
        (m["trainer_groups"] == m["minift_groups"], "the parameter groups have the same sizes on both sides"),
        (all(m[s]["diff"]["lr"] == 0 for s in SAMPLINGS), "the learning rates are equal"),
        (rand["trainer_logged"][0][0] == STEP, f"Trainer's first logged step is {STEP}"),
        (stage["lr"] == rand["trainer_logged"][0][2], "minift's lr at the step is Trainer's"),
    ]
    return [f"the doc says {what}, which no longer holds" for ok, what in checks if not ok]


# -- the doc's blocks ----------------------------------------------------------------------------------------
BLOCK = re.compile(r"<!-- numbers:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /numbers -->", re.DOTALL)
# a number standing alone: not part of a word, a path, a version or a name like GPT-2
NUMBER = re.compile(r"(?<![\w.\-/])\d+(?:\.\d+)?(?:e-?\d+)?(?![\w/]|\.\d)")
EVENT = re.compile(r"`(on_[a-z_]+)`")


def blocks(text: str) -> dict[str, str]:
    found = {}
    for match in BLOCK.finditer(text):
        if match["name"] in found:
            raise ValueError(f"block {match['name']!r} appears twice")
        found[match["name"]] = match["body"]
    return found


def check(text: str, m: dict) -> list[str]:
    """Every difference between the doc's blocks and the measurement ``m``."""
    errors = claims(m)
    want, have = expected(m), blocks(text)
    for name in sorted(set(want) ^ set(have)):
        problem = "missing from the doc" if name in want else "has no expected numbers"
        errors.append(f"block {name!r}: {problem}")
    for name in sorted(set(want) & set(have)):
        printed = NUMBER.findall(have[name])
        if len(printed) != len(want[name]):
            errors.append(f"block {name!r} holds {len(printed)} numbers {printed}, "
                          f"expected {len(want[name])}: {[n.text() for n in want[name]]}")
            continue
        errors += [f"block {name!r}, number {i + 1}: {error}" for i, (shown, number)
                   in enumerate(zip(printed, want[name])) if (error := number.error(shown))]
    if "events" in have and EVENT.findall(have["events"]) != expected_events(m):
        listed = EVENT.findall(have["events"])
        errors.append(f"block 'events' lists {listed}, Trainer called {expected_events(m)}")
    return errors


def write(text: str, m: dict) -> str:
    """``text`` with every block's numbers replaced by the measured ones. A block must already hold as
    many numbers as it should (write the sentence, then let this fill in the values)."""
    want = expected(m)
    counts = {name: (len(NUMBER.findall(body)), len(want.get(name, [])))
              for name, body in blocks(text).items()}
    miscounted = [f"block {name!r} holds {has} numbers, expected {should}"
                  for name, (has, should) in counts.items() if has != should]
    if miscounted:
        raise ValueError("; ".join(miscounted))

    def rewrite(match):
        numbers = iter(want[match["name"]])
        body = NUMBER.sub(lambda _: next(numbers).text(), match["body"])
        return f"<!-- numbers:{match['name']} -->\n{body}<!-- /numbers -->"

    return BLOCK.sub(rewrite, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the doc; exit 1 on a difference")
    parser.add_argument("--write", action="store_true", help="write them into the doc and the snapshot")
    args = parser.parse_args(argv)
    measured = measure()
    text = DOC.read_text(encoding="utf-8")
    if args.write:
        try:
            DOC.write_text(write(text, measured), encoding="utf-8")
        except ValueError as err:
            print(f"{DOC.name}: {err}", file=sys.stderr)
            return 1
        SNAPSHOT.write_text(json.dumps(measured, indent=1) + "\n", encoding="utf-8")
        text = DOC.read_text(encoding="utf-8")
    if args.check or args.write:
        errors = check(text, measured)
        print("\n".join(errors) or f"{DOC.name}: every number matches the measurement")
        return 1 if errors else 0
    print(json.dumps(measured, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
