"""The reward model: a language model's backbone with a scalar head on the last real token, trained
with the Bradley–Terry loss on preference pairs.

    hidden = backbone(prompt + completion)          (the LM's transformer, no LM head)
    reward = score(hidden at the row's last real token)   (Linear(n_embd, 1), no bias)
    loss   = -log σ(r_chosen - r_rejected), summed over pairs; pairwise accuracy = P(r_chosen > r_rejected)

The weights are saved in transformers' ``…ForSequenceClassification`` layout of the family
(``OpenAIGPT…`` / ``GPT2…``: ``transformer.*``; ``Llama…``, ``Qwen2…``, ``Qwen3…``, ``Mistral…``:
``model.*``) with ``num_labels = 1``, ``score.weight`` and ``pad_token_id`` in config.json, so
``AutoModelForSequenceClassification`` loads what minift saves.
transformers finds "the last real token" as the last id that is not ``pad_token_id``; minift uses
the attention mask. They agree while no real token is the pad id: the tweet pairs end on the label
(no EOS appended), so with GPT-2's pad = EOS nothing is lost.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..hub import CheckpointError, read_state_dict, resolve_checkpoint
from ..models import build_model, config_from_json_file
from ..models.base import CONFIG_NAME, WEIGHTS_NAME, CausalLM
from ..models.config import read_json_object
from .pairs import PairLoss, append_eos_for


def sequence_classifier(config) -> str:
    """transformers' sequence-classification class of the family, named from its language model's
    (``GPT2LMHeadModel`` -> ``GPT2ForSequenceClassification``, ``LlamaForCausalLM`` ->
    ``LlamaForSequenceClassification``)."""
    return re.sub(r"(LMHeadModel|ForCausalLM)$", "ForSequenceClassification", config.architecture)


class RewardModel(nn.Module):
    """The backbone under the name transformers gives it (``transformer`` for GPT-1/GPT-2, ``model``
    for the Llama family; shared with the ``CausalLM`` it is built from) + ``score`` head."""

    def __init__(self, lm: CausalLM, pad_token_id: int | None):
        super().__init__()
        self.config = lm.config
        self.add_module(lm.base_model_prefix, lm.base_model)
        self._hidden_states = lm.hidden_states  # the LM's forward up to the head (mask, positions, blocks)
        self.score = nn.Linear(lm.config.n_embd, 1, bias=False, device=lm.token_embedding.weight.device,
                               dtype=lm.token_embedding.weight.dtype)
        self.pad_token_id = pad_token_id
        # the embedding may hold padding rows past the vocabulary (CausalLM.pad_vocab): saved without them
        self.vocab_keys = {k for k in lm.vocab_weight_keys() if k.startswith(f"{lm.base_model_prefix}.")}
        nn.init.normal_(self.score.weight, std=lm.config.initializer_range)  # transformers' init of the head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One reward per row: the head applied at the row's last token with attention_mask 1."""
        hidden = self._hidden_states(input_ids, attention_mask)
        last = attention_mask.sum(dim=1) - 1
        return self.score(hidden[torch.arange(len(input_ids), device=input_ids.device), last]).squeeze(-1)

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """transformers' keys and shapes: vocabulary rows only (no padding rows)."""
        return {k: (v[:self.config.vocab_size] if k in self.vocab_keys else v).detach().contiguous()
                for k, v in self.state_dict().items()}

    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json (sequence-classification architecture, num_labels 1, pad_token_id) +
        model.safetensors with the backbone's keys and ``score.weight``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config.update(architectures=[sequence_classifier(self.config)], id2label={"0": "LABEL_0"},
                      label2id={"LABEL_0": 0}, pad_token_id=self.pad_token_id)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(self.state_dict_for_save(), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory


def load_reward_model(name_or_path: str | Path) -> RewardModel:
    """A reward model saved by minift or by transformers (``…ForSequenceClassification``, num_labels 1)."""
    directory = resolve_checkpoint(name_or_path)
    raw = read_json_object(directory / CONFIG_NAME)
    architectures = raw.get("architectures") or []
    if architectures and not any("SequenceClassification" in str(a) for a in architectures):
        raise CheckpointError(f"{directory} holds a {architectures[0]} (a language model), not a reward "
                              "model — give the model folder of minift reward; a language model samples "
                              "with --policy")
    if len(raw.get("id2label", {"0": 0})) != 1:
        raise CheckpointError(f"{directory}: a reward model has num_labels = 1, config.json has "
                              f"{len(raw['id2label'])} labels")
    with torch.device("meta"):
        model = RewardModel(build_model(config_from_json_file(directory / CONFIG_NAME)),
                            raw.get("pad_token_id"))
    load_reward_weights(model, directory, assign=True)
    return model.eval()


def load_reward_weights(model: RewardModel, directory: Path, assign: bool = False) -> None:
    """Copy the backbone + ``score.weight`` from ``directory``; every key must match (the
    vocabulary rows get the model's zero padding rows back, as ``CausalLM`` loads them)."""
    tensors, origin = read_state_dict(Path(directory))
    expected = model.state_dict()
    for key in model.vocab_keys & tensors.keys():
        rows, padded_rows = tensors[key].shape[0], expected[key].shape[0]
        if rows == model.config.vocab_size < padded_rows \
                and tensors[key].shape[1:] == expected[key].shape[1:]:
            tensors[key] = torch.cat([tensors[key],
                                      tensors[key].new_zeros(padded_rows - rows, *tensors[key].shape[1:])])
    problems = [f"missing key {k}" for k in expected.keys() - tensors.keys()]
    problems += [f"unexpected key {k} in {origin[k]}" for k in tensors.keys() - expected.keys()]
    problems += [f"shape mismatch for {k}: {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}"
                 for k in tensors.keys() & expected.keys() if tensors[k].shape != expected[k].shape]
    if problems:
        raise CheckpointError(f"{directory} is not a reward model of this config:\n  "
                              + "\n  ".join(sorted(problems)))
    model.load_state_dict(tensors, strict=True, assign=assign)


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> PairLoss:
    """Summed -log σ(r_c - r_r) and summed pairwise accuracy / margin (the loop divides by pairs)."""
    margin = chosen - rejected
    metrics = {"accuracy": (margin.detach() > 0).sum(), "margin": margin.detach().sum(),
               "rewards/chosen": chosen.detach().sum(), "rewards/rejected": rejected.detach().sum()}
    return PairLoss(-F.logsigmoid(margin).sum(), metrics)


def reward_loss(model: nn.Module, batch: dict, device: torch.device) -> PairLoss:
    """The reward-model objective (wrapped in ``PairObjective`` for ``loop.train``): rewards of
    [chosen; rejected] rows in one forward."""
    rewards = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    return bradley_terry(*rewards.float().chunk(2))


@torch.no_grad()
def score_texts(model: RewardModel, sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device,
                batch_size: int = 64) -> torch.Tensor:
    """Rewards of token sequences (right-padded together, ``batch_size`` at a time)."""
    too_long = [len(s) for s in sequences if len(s) > model.config.n_positions]
    if too_long:
        raise InputError(f"a sequence of {too_long[0]} tokens to score; the reward model holds "
                         f"{model.config.n_positions} — shorten the prompt or the completions")
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        time = max(len(s) for s in chunk)
        input_ids = torch.full((len(chunk), time), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        out.append(model.eval().to(device)(input_ids.to(device), attention_mask.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def best_of_n(policy: CausalLM, reward_model: RewardModel, prompt: str, policy_tokenizer, reward_tokenizer,
              n: int = 8, max_new_tokens: int = 8, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
              device: torch.device | str = "cpu", batch_size: int = 256,
              progress: Callable[[int, int], None] = lambda done, total: None) -> list[tuple[float, str]]:
    """Best-of-n: ``n`` continuations of ``prompt`` sampled from ``policy`` (``CausalLM.generate_many``:
    ``batch_size`` rows per batch, one seeded generator for all; ``progress(done, n)`` after each),
    each scored by ``reward_model`` on prompt + continuation. Returns ``(reward, continuation)`` pairs,
    best first."""
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = policy_tokenizer.encode(prompt)
    continuations: list[str] = []
    while len(continuations) < n:
        rows = policy.generate_many(prompt_ids, min(batch_size, n - len(continuations)),
                                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                    eos_id=policy_tokenizer.eos_id, generator=generator)
        continuations += [policy_tokenizer.decode(ids[len(prompt_ids):], skip_special_tokens=True)
                          for ids in rows]
        progress(len(continuations), n)
    sequences = [reward_tokenizer.encode(f"{prompt} {text}".rstrip()) for text in continuations]
    pad = reward_tokenizer.pad_id if reward_tokenizer.pad_id is not None else 0
    rewards = score_texts(reward_model, sequences, pad, torch.device(device)).tolist()
    return sorted(zip(rewards, continuations), key=lambda pair: -pair[0])


def saved_run_config(model_dir: str | Path) -> dict:
    """The run config a minift model folder was trained with ({} for a folder minift did not write)."""
    path = Path(model_dir) / "run_config.json"
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a minift run config ({err}) — remove it, or "
                         f"pass the completions") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a minift run config (a JSON {type(config).__name__}) — remove it, or "
                         "pass the completions")
    return config


def trained_with_eos(run_config: dict, tokenizer) -> bool:
    """Whether a reward model saw EOS after each completion, from its folder's run config
    (``saved_run_config``): ``pairs.append_eos`` resolved as training resolved it; a folder minift
    did not write (no pairs entry) is taken as TRL trains: "auto"."""
    pairs = run_config.get("pairs")
    setting = pairs.get("append_eos", "no") if isinstance(pairs, dict) else "auto"
    return append_eos_for(setting, tokenizer, "reward") and tokenizer.eos_id is not None
