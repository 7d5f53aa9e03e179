"""The collators against hand-computed tensors, and packing against each example run alone."""
from __future__ import annotations

import pytest
import torch

from minift.collate import Collator, PackingCollator, model_inputs
from minift.models import GPT2Config, GPTConfig, build_model

EXAMPLES = [
    {"input_ids": [5, 6, 7, 8], "prompt_length": 3},
    {"input_ids": [9, 10], "prompt_length": 1},
    {"input_ids": [11, 12, 13], "prompt_length": 2},
]
P = 99  # pad id
X = -100


def test_right_padding_labels_and_counts_by_hand():
    batch = Collator(pad_id=P)(EXAMPLES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, P, P], [11, 12, 13, P]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, 8], [9, 10, X, X], [11, 12, 13, X]]
    assert batch["n_real_tokens"] == 9 and batch["n_padded_tokens"] == 12
    assert batch["n_loss_targets"] == 3 + 1 + 2  # the first token of each row is never a target
    assert batch["n_label_tokens"] == 9  # Trainer's GPT-1 count


def test_completion_masks_the_prompt():
    batch = Collator(pad_id=P, objective="completion")(EXAMPLES)
    assert batch["labels"].tolist() == [[X, X, X, 8], [X, 10, X, X], [X, X, 13, X]]
    assert batch["n_loss_targets"] == 3


def test_pad_to_multiple_and_max_length():
    batch = Collator(pad_id=P, pad_to_multiple_of=8)(EXAMPLES)
    assert batch["input_ids"].shape == (3, 8) and batch["n_padded_tokens"] == 24
    assert batch["labels"][:, 4:].eq(X).all()
    batch = Collator(pad_id=P, padding="max_length", max_length=6)(EXAMPLES)
    assert batch["input_ids"].shape == (3, 6) and batch["n_real_tokens"] == 9


def test_bad_collator_settings():
    with pytest.raises(ValueError, match="objective"):
        Collator(pad_id=P, objective="prompt")
    with pytest.raises(ValueError, match="needs max_length"):
        Collator(pad_id=P, padding="max_length")
    with pytest.raises(ValueError, match="no pad token"):
        Collator(pad_id=None)


def test_packing_layout_by_hand():
    batch = PackingCollator(pad_id=P, row_length=6)(EXAMPLES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [11, 12, 13, P, P, P]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, -1, -1, -1]]
    # the second example's first token (9) is not a target: it would be predicted from 8
    assert batch["labels"].tolist() == [[X, 6, 7, 8, X, 10], [X, 12, 13, X, X, X]]
    assert batch["n_loss_targets"] == 6 and batch["n_real_tokens"] == 9


@pytest.mark.parametrize("config", [GPTConfig(vocab_size=100, n_positions=16, n_embd=16, n_layer=2, n_head=2),
                                    GPT2Config(vocab_size=100, n_positions=16, n_embd=16, n_layer=2,
                                               n_head=2)])
@pytest.mark.parametrize("objective", ["all", "completion"])
def test_packed_equals_each_example_alone(config, objective):
    torch.manual_seed(0)
    model = build_model(config).eval()
    packed = PackingCollator(pad_id=P, row_length=9, objective=objective)(EXAMPLES)
    with torch.no_grad():
        logits = model(packed["input_ids"], position_ids=packed["position_ids"],
                       document_ids=packed["document_ids"])
        packed_loss = model(**model_inputs(packed, "cpu"))
        alone_sum, alone_targets = 0.0, 0
        start = 0
        for example in EXAMPLES:
            single = Collator(pad_id=P, objective=objective)([example])
            n = len(example["input_ids"])
            alone = model(single["input_ids"])
            torch.testing.assert_close(logits[0, start:start + n], alone[0], rtol=0, atol=1e-5)
            out = model(**model_inputs(single, "cpu"))
            alone_sum += float(out.loss_sum)
            alone_targets += out.n_loss_targets
            start += n
    assert packed_loss.n_loss_targets == alone_targets
    assert float(packed_loss.loss_sum) == pytest.approx(alone_sum, rel=1e-5)
