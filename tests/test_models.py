"""The models against transformers' reference outputs (shared fixtures) and against
independent computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minift
from minift.models import GPT2Config, GPTConfig, build_model
from minift.models.layers import ACTIVATIONS, gelu_tanh
from minift.models.lm_loss import lm_loss_sum

from conftest import shared_path

CASES = [  # checkpoint dir, reference dir, atol on real positions
    ("tiny-openai-gpt", "tiny-openai-gpt", 1e-5),
    ("tiny-openai-gpt-bin", "tiny-openai-gpt", 1e-5),
    ("tiny-openai-gpt-perturbed", "tiny-openai-gpt-perturbed", 1e-5),
    ("tiny-gpt2", "tiny-gpt2", 1e-5),
    ("tiny-gpt2-base", "tiny-gpt2", 1e-5),
]


def _reference(name):
    ref = np.load(shared_path("fixtures", name, "reference_logits.npz"))
    return {k: torch.from_numpy(ref[k])
            for k in ("input_ids", "attention_mask", "logits", "loss", "n_loss_targets")}


@pytest.mark.shared
@pytest.mark.parametrize("checkpoint,reference,atol", CASES)
def test_logits_and_loss_match_transformers(checkpoint, reference, atol):
    model = minift.from_pretrained(shared_path("fixtures", checkpoint))
    ref = _reference(reference)
    real = ref["attention_mask"].bool()
    with torch.no_grad():
        logits = model(ref["input_ids"], attention_mask=ref["attention_mask"])
        labels = ref["input_ids"].masked_fill(~real, -100)
        out = model(ref["input_ids"], attention_mask=ref["attention_mask"], labels=labels)
    assert logits.shape == ref["logits"].shape
    assert (logits - ref["logits"])[real].abs().max() < atol
    # pads too: the key-padding mask is applied when logits at pads are returned
    assert (logits - ref["logits"]).abs().max() < 1e-4
    assert out.n_loss_targets == int(ref["n_loss_targets"])
    assert abs(out.loss_sum.item() / out.n_loss_targets - ref["loss"].item()) < 1e-5


@pytest.mark.shared
def test_loss_path_equals_full_logits_cross_entropy():
    """The label-only, chunked LM head gives the loss of the plain full-logits computation."""
    model = minift.from_pretrained(shared_path("fixtures", "tiny-openai-gpt-perturbed"))
    ref = _reference("tiny-openai-gpt-perturbed")
    labels = ref["input_ids"].masked_fill(ref["attention_mask"] == 0, -100)
    labels[0, :4] = -100  # a masked prompt
    with torch.no_grad():
        logits = model(ref["input_ids"])
        plain = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                ignore_index=-100, reduction="sum")
        hidden = model.transformer(ref["input_ids"], torch.arange(10)[None], None)
        chunked = lm_loss_sum(hidden, model.lm_head_weight, labels, chunk_rows=3)
        through_forward = model(ref["input_ids"], labels=labels)
    assert chunked.n_loss_targets == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(chunked.loss_sum, plain, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(through_forward.loss_sum, plain, rtol=1e-6, atol=1e-5)


def test_gelu_is_the_tanh_approximation():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    expected = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(gelu_tanh(x), expected, rtol=0, atol=1e-12)
    assert (ACTIVATIONS["gelu"](x) - expected).abs().max() > 1e-5  # GPT-2 "gelu" is the exact one


def test_gpt1_gelu_maps_to_tanh_gelu():
    model = build_model(GPTConfig(vocab_size=50, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    assert model.transformer.h[0].mlp.act is gelu_tanh


def _manual_gpt1_forward(model, ids):
    """A second, loop-by-loop computation of GPT-1 from its parameters (no SDPA, no Conv1D)."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    T = ids.shape[1]
    h = sd["transformer.tokens_embed.weight"][ids] + sd["transformer.positions_embed.weight"][:T]
    d = cfg.n_embd // cfg.n_head
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        qkv = h @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]
        q, k, v = qkv.split(cfg.n_embd, -1)
        heads = []
        for j in range(cfg.n_head):
            qs, ks, vs = (t[..., j * d:(j + 1) * d] for t in (q, k, v))
            w = qs @ ks.transpose(-1, -2) / math.sqrt(d)
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            w = w * causal - 1e4 * (~causal)
            heads.append(torch.softmax(w, -1) @ vs)
        a = torch.cat(heads, -1) @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        n = F.layer_norm(h + a, (cfg.n_embd,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"],
                         cfg.layer_norm_epsilon)
        m = gelu_tanh(n @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"])
        m = m @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
        h = F.layer_norm(n + m, (cfg.n_embd,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"],
                         cfg.layer_norm_epsilon)
    return h @ sd["transformer.tokens_embed.weight"].T


def test_gpt1_matches_a_loop_by_loop_computation():
    torch.manual_seed(3)
    model = build_model(GPTConfig(vocab_size=97, n_positions=16, n_embd=24, n_layer=2, n_head=3))
    with torch.no_grad():
        for p in model.parameters():  # non-trivial biases and LayerNorms
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        got = model(ids).double()
    torch.testing.assert_close(got, _manual_gpt1_forward(model, ids), rtol=0, atol=1e-4)


def test_right_padding_leaves_real_positions_unchanged():
    torch.manual_seed(0)
    model = build_model(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
    ids = torch.randint(0, 64, (1, 6))
    padded = torch.cat([ids, torch.full((1, 4), 5)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        alone = model(ids)
        both = model(padded, attention_mask=mask)
    torch.testing.assert_close(both[:, :6], alone, rtol=0, atol=1e-6)


def test_full_openai_gpt_shape_builds_and_trains_a_step():
    config = GPTConfig(vocab_size=40479)
    model = build_model(config)
    # 116.5 M parameters with [PAD]: the number quoted for openai-gpt
    assert model.num_parameters() == 40479 * 768 + 512 * 768 + 12 * (
        768 * 2304 + 2304 + 768 * 768 + 768 + 2 * 768 + 768 * 3072 + 3072 + 3072 * 768 + 768 + 2 * 768)
    ids = torch.randint(0, 40478, (2, 12))
    out = model(ids, labels=ids)
    (out.loss_sum / out.n_loss_targets).backward()
    assert out.n_loss_targets == 22
    grad = model.transformer.tokens_embed.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_too_long_input_is_refused():
    model = build_model(GPTConfig(vocab_size=10, n_positions=4, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="exceeds n_positions=4"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_resize_token_embeddings_mean_init_and_tied_head():
    model = build_model(GPTConfig(vocab_size=30, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    old = model.transformer.tokens_embed.weight.detach().clone()
    model.resize_token_embeddings(32)
    new = model.transformer.tokens_embed.weight
    assert new.shape == (32, 8) and model.config.vocab_size == 32
    torch.testing.assert_close(new[:30], old)
    torch.testing.assert_close(new[30], old.mean(0))
    torch.testing.assert_close(new[31], old.mean(0))
    assert model.padded_head_weight is new and torch.equal(model.lm_head_weight, new)  # tied
    assert model(torch.tensor([[31, 1]])).shape == (1, 2, 32)


@pytest.mark.requires("transformers")
@pytest.mark.parametrize("model_type", ["openai-gpt", "gpt2"])
@pytest.mark.parametrize("variant", ["plain", "relu", "scaled"])
def test_random_configs_match_transformers(tmp_path, model_type, variant):
    """Other shapes and settings than the fixtures: build with transformers, load with minift."""
    import transformers

    torch.manual_seed(1)
    if model_type == "openai-gpt":
        kwargs = dict(vocab_size=123, n_positions=24, n_embd=48, n_layer=3, n_head=6)
        if variant == "relu":
            kwargs["afn"] = "relu"
        ref = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(**kwargs))
    else:
        kwargs = dict(vocab_size=123, n_positions=24, n_embd=48, n_layer=3, n_head=6, n_inner=80)
        if variant == "relu":
            kwargs["activation_function"] = "relu"
        if variant == "scaled":
            kwargs["scale_attn_by_inverse_layer_idx"] = True
        ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.eval().save_pretrained(tmp_path)
    model = minift.from_pretrained(tmp_path)
    ids = torch.randint(0, 123, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask)
    real = mask.bool()
    assert (got - expected)[real].abs().max() < 1e-5


# loss_rows, attention, fused_head, pad_vocab multiple
HOT_PATHS = [("labelled", "sdpa", False, 1), ("all", "sdpa", False, 1), ("labelled", "eager", False, 1),
             ("all", "eager", False, 1), ("labelled", "sdpa", False, 64), ("all", "sdpa", False, 64),
             ("labelled", "sdpa", True, 64), ("all", "sdpa", True, 64), ("all", "sdpa", True, 1)]


@pytest.mark.shared
@pytest.mark.parametrize("loss_rows,attention,fused_head,pad_vocab", HOT_PATHS)
def test_every_hot_path_setting_matches_transformers(loss_rows, attention, fused_head, pad_vocab):
    """The benchmark's lever switches change speed only: the transformers reference still holds."""
    model = minift.from_pretrained(shared_path("fixtures", "tiny-openai-gpt-perturbed")).pad_vocab(pad_vocab)
    model.set_hot_path(loss_rows=loss_rows, attention=attention, fused_head=fused_head)
    ref = _reference("tiny-openai-gpt-perturbed")
    real = ref["attention_mask"].bool()
    with torch.no_grad():
        logits = model(ref["input_ids"], attention_mask=ref["attention_mask"])
        out = model(ref["input_ids"], attention_mask=ref["attention_mask"],
                    labels=ref["input_ids"].masked_fill(~real, -100))
    assert (logits - ref["logits"])[real].abs().max() < 1e-5
    assert out.n_loss_targets == int(ref["n_loss_targets"])
    assert abs(out.loss_sum.item() / out.n_loss_targets - ref["loss"].item()) < 1e-5


@pytest.mark.parametrize("config", [GPTConfig(vocab_size=97, n_positions=16, n_embd=16, n_layer=2, n_head=2),
                                    GPT2Config(vocab_size=97, n_positions=16, n_embd=16, n_layer=2,
                                               n_head=2)],
                         ids=["gpt1", "gpt2"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_hot_path_levers_keep_loss_and_gradients(config, padding):
    """Each lever (label-only LM head, mask-free SDPA) against its plain path: same loss and
    same gradients, in float64, on a batch with uneven lengths and a masked prompt."""
    lengths = [9, 4, 12, 7]
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        if padding == "right":
            mask[row, :n] = 1
        else:
            mask[row, 12 - n:] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100
    results = {}
    for loss_rows, attention, fused_head, pad_vocab in HOT_PATHS:
        torch.manual_seed(0)
        model = build_model(config).double().pad_vocab(pad_vocab)
        model.set_hot_path(loss_rows=loss_rows, attention=attention, fused_head=fused_head)
        out = model(ids, attention_mask=mask, labels=labels)
        (out.loss_sum / out.n_loss_targets).backward()
        embedding = model.token_embedding.weight
        assert embedding.shape[0] == -(-97 // pad_vocab) * pad_vocab
        assert not embedding.grad[97:].any()  # padding rows: no probability mass, no gradient
        grads = {n: p.grad[:97] if p is embedding else p.grad.clone() for n, p in model.named_parameters()}
        results[loss_rows, attention, fused_head, pad_vocab] = (out, grads)
    base_out, base_grads = results["labelled", "sdpa", False, 1]
    assert base_out.n_loss_targets == int((labels[:, 1:] != -100).sum())
    for key, (out, grads) in results.items():
        assert out.n_loss_targets == base_out.n_loss_targets, key
        torch.testing.assert_close(out.loss_sum, base_out.loss_sum, rtol=1e-10, atol=1e-10, msg=str(key))
        for name, grad in grads.items():
            torch.testing.assert_close(grad, base_grads[name], rtol=1e-8, atol=1e-10, msg=f"{key} {name}")


def test_hot_path_refuses_unknown_settings():
    model = build_model(GPTConfig(vocab_size=10, n_positions=4, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="attention 'sdpa' or 'eager' \\(got 'flash'\\)"):
        model.set_hot_path(attention="flash")
    with pytest.raises(ValueError, match="loss_rows must be 'labelled' or 'all' \\(got 'some'\\)"):
        model.set_hot_path(loss_rows="some")


@pytest.mark.parametrize("config_cls", [GPTConfig, GPT2Config])
@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (1.0, 0), (0.8, 5)])
def test_generate_with_kv_cache_equals_recomputing_the_prefix(config_cls, temperature, top_k):
    torch.manual_seed(0)
    model = build_model(config_cls(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    prompt = [5, 17, 3, 42, 8]
    runs = [model.generate(prompt, max_new_tokens=40, temperature=temperature, top_k=top_k,
                           use_cache=use_cache, generator=torch.Generator().manual_seed(3))
            for use_cache in (True, False)]
    assert runs[0] == runs[1]
    assert runs[0][:5] == prompt and len(runs[0]) == 32  # stops when the sequence fills n_positions


def test_kv_cache_hidden_states_equal_the_full_forward():
    """Prefill + token-by-token and prefill + a multi-token chunk give the full forward's hidden states."""
    torch.manual_seed(0)
    model = build_model(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4)).eval()
    ids = torch.randint(0, 50, (1, 12))
    full = model.hidden_states(ids)
    cache = model.new_kv_cache()
    parts = [model.hidden_states(ids[:, :5], kv_cache=cache),
             model.hidden_states(ids[:, 5:9], kv_cache=cache)]
    parts += [model.hidden_states(ids[:, t:t + 1], kv_cache=cache) for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)
    model.set_hot_path(attention="eager")
    cache = model.new_kv_cache()
    chunked = torch.cat([model.hidden_states(ids[:, :7], kv_cache=cache),
                         model.hidden_states(ids[:, 7:], kv_cache=cache)], 1)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)


def test_multi_token_label_scores_equal_a_full_recomputation():
    from minift.evaluate import label_log_probs

    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=60, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11], [12]]
    labels = [[20], [21, 22, 23], [24, 25]]
    scores = label_log_probs(model, prompts, labels, pad_id=59, device="cpu")
    for p, prompt in enumerate(prompts):
        for c, label in enumerate(labels):
            logp = torch.log_softmax(model(torch.tensor([prompt + label]))[0].double(), dim=-1)
            expected = sum(logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(label))
            assert scores[p, c].item() == pytest.approx(expected.item(), abs=1e-4)


def test_generate_refuses_bad_arguments():
    model = build_model(GPTConfig(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    for kwargs, message in (({"temperature": float("nan")}, "temperature"), ({"top_k": -3}, "top_k")):
        with pytest.raises(ValueError, match=message):
            model.generate([1, 2], **kwargs)
    with pytest.raises(ValueError, match="no tokens"):
        model.generate([])
