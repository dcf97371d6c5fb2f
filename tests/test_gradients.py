"""Training-mode behaviour against transformers: gradients, dropout placement, initialisation.

Forward equivalence (test_model.py) says nothing about training: a detached tensor, a dropout in the
wrong place or a wrong init would all pass it. Here every parameter's gradient of a loss on the
pooled outputs must match transformers' BertModel (dropout off, train mode, padded batches), and
with dropout on, the same random seed must give the same output, which can only happen when every
dropout sits where transformers has one, with the same shape, and nowhere else.
"""
import dataclasses

import pytest
import torch
from conftest import TINY, gradient_errors, hf_reference_model, random_batch, training_pair

import minibge
from minibge import BertConfig, BertModel

MAX_RELATIVE_GRAD_ERROR = 1e-4  # per parameter tensor: ‖g_ours − g_hf‖ / ‖g_hf‖


def no_dropout(config):
    return dataclasses.replace(config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def assert_gradients_match(model, hf_model, batch, label):
    for attn_impl in ("sdpa", "manual"):
        model.set_attn_impl(attn_impl)
        errors = gradient_errors(model, hf_model, *batch)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= MAX_RELATIVE_GRAD_ERROR, \
            f"{label}/{attn_impl}: worst relative gradient error {errors[worst]:.3e} in {worst}; " \
            f"mean over {len(errors)} tensors {sum(errors.values()) / len(errors):.3e}"


def test_gradients_match_transformers_tiny():
    config = no_dropout(BertConfig(**TINY))
    model, hf_model = training_pair(config)
    for seed in range(3):
        assert_gradients_match(model, hf_model, random_batch(config, 5, 24, seed=seed), f"tiny seed {seed}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bge-small-en-v1.5", "bge-small-zh-v1.5"])
def test_gradients_match_transformers_on_presets(name):
    config = no_dropout(minibge.preset(name))
    model, hf_model = training_pair(config)
    assert_gradients_match(model, hf_model, random_batch(config, 3, 40, seed=4), name)


@pytest.mark.slow
def test_gradients_match_transformers_on_real_minilm(minilm_dir):
    from transformers import AutoModel
    hf_model = AutoModel.from_pretrained(minilm_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model, hf_model = training_pair(no_dropout(minibge.load_model(minilm_dir).config), hf_model=hf_model)
    assert_gradients_match(model, hf_model, random_batch(model.config, 4, 64, seed=5), "all-MiniLM-L6-v2")


# -----------------------------------------------------------------------------
# Dropout: where transformers applies it, and nowhere else

@pytest.mark.parametrize("attn_impl, reference_impl", [("manual", "eager"), ("sdpa", "sdpa")])
def test_dropout_draws_the_same_masks_as_transformers(attn_impl, reference_impl):
    # transformers drops out: the embeddings' output, the attention probabilities, the attention block's
    # output projection and the feed-forward's output. Same places, same shapes, same order ⇒ the same
    # random masks from the same seed ⇒ the same output. One dropout more, less or elsewhere breaks it.
    config = dataclasses.replace(BertConfig(**TINY), hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3)
    hf_model = hf_reference_model(config, attn_implementation=reference_impl).train()
    model, _ = training_pair(config, hf_model=hf_model)
    model.set_attn_impl(attn_impl)
    ids, mask, types = random_batch(config, 4, 16, seed=6)
    torch.manual_seed(123)
    ours = model(ids, mask, types)
    torch.manual_seed(123)
    ref = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    diff = (ours - ref)[real].abs()
    assert diff.max() <= 1e-5, f"max |diff| {diff.max():.3e}, mean {diff.mean():.3e}"
    with torch.no_grad():
        model.eval()
        assert not torch.allclose(model(ids, mask, types)[real], ours[real], atol=1e-3), "dropout had no effect"


@pytest.mark.parametrize("hidden_p, attention_p", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5)])
def test_dropout_acts_only_in_train_mode_and_only_when_asked(hidden_p, attention_p):
    config = dataclasses.replace(BertConfig(**TINY), hidden_dropout_prob=hidden_p, attention_probs_dropout_prob=attention_p)
    model = BertModel(config)
    ids, mask, types = random_batch(config, 3, 12, seed=1)
    with torch.no_grad():
        train_out = model.train()(ids, mask, types)
        eval_out = model.eval()(ids, mask, types)
    if hidden_p == attention_p == 0.0:
        assert torch.equal(train_out, eval_out), "train mode changed the output with every dropout at 0"
    else:
        assert not torch.allclose(train_out, eval_out), f"dropout ({hidden_p}, {attention_p}) had no effect"


# -----------------------------------------------------------------------------
# Initialisation (_init_weights): what a model trained from scratch starts from

def test_init_weights_follow_transformers():
    config = dataclasses.replace(BertConfig(**TINY), vocab_size=4000, hidden_size=128, intermediate_size=256)
    torch.manual_seed(0)
    model = BertModel(config)
    hf_model = hf_reference_model(config)  # only for its init statistics
    hf_model.apply(hf_model._init_weights)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, f"{name}: biases start at 0"
        elif "norm" in name:
            assert torch.all(param == 1), f"{name}: LayerNorm weights start at 1"
        else:
            std = param.std().item()
            assert abs(std - config.initializer_range) < 0.1 * config.initializer_range, f"{name}: std {std:.4f}"
            assert abs(param.mean().item()) < 0.1 * config.initializer_range, f"{name}: mean {param.mean():.4f}"
    pad_row = model.embeddings.word_embeddings.weight[config.pad_token_id]
    assert torch.count_nonzero(pad_row) == 0, "the [PAD] row of the word embeddings must start at zero"
    assert torch.count_nonzero(hf_model.embeddings.word_embeddings.weight[config.pad_token_id]) == 0
    # re-applying the init resets a perturbed model, as transformers' post_init would
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    model.apply(model._init_weights)
    assert torch.count_nonzero(model.embeddings.word_embeddings.weight[config.pad_token_id]) == 0
    assert torch.all(model.layers[0].ffn_norm.weight == 1) and torch.all(model.layers[0].feed_forward.up.bias == 0)


def test_padding_row_gets_no_gradient():
    # nn.Embedding(padding_idx=...) never updates the [PAD] row, as in transformers
    config = no_dropout(BertConfig(**TINY))
    model = BertModel(config).train()
    ids, mask, types = random_batch(config, 3, 10, seed=2)
    model(ids, mask, types).sum().backward()
    grad = model.embeddings.word_embeddings.weight.grad
    assert torch.count_nonzero(grad[config.pad_token_id]) == 0 and torch.count_nonzero(grad) > 0


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_gradient_checkpointing_flag_gives_the_same_gradients(attn_impl):
    # BertModel.gradient_checkpointing recomputes each layer in backward: the gradients must not change
    config = no_dropout(BertConfig(**TINY))
    torch.manual_seed(0)
    plain = BertModel(config, attn_impl=attn_impl).train()
    flagged = BertModel(config, attn_impl=attn_impl).train()
    flagged.load_state_dict(plain.state_dict())
    flagged.gradient_checkpointing = True
    ids, mask, types = random_batch(config, 4, 16, seed=2)
    for model in (plain, flagged):
        hidden = model(ids, mask, types)
        (hidden[mask.bool()].square().mean() + model.pooler_output(hidden).sum()).backward()
    for (name, a), b in zip(plain.named_parameters(), flagged.parameters()):
        error = ((b.grad - a.grad).norm() / a.grad.norm().clamp(min=1e-30)).item()
        assert error <= 1e-5, f"{name}: relative gradient error {error:.3e}"
