"""minibge.BertModel against transformers.BertModel, and the properties an encoder must have."""
import dataclasses

import pytest
import torch
from conftest import TINY, compare_with_hf, diff_report, hf_reference_model, official_state_dict, random_batch
from hypothesis import given, settings
from hypothesis import strategies as st

import minibge
from minibge import BertConfig, BertModel
from minibge.weights import load_state_into

MAX_ABS_TOL = 1e-4       # acceptance: max |diff| of the last hidden state at real positions
MIN_CLS_COSINE = 0.999999

# the distinct architectures among the presets (v1 and v1.5 share one)
PRESET_SHAPES = ["bge-small-en-v1.5", "bge-base-en-v1.5", "bge-large-en-v1.5",
                 "bge-small-zh-v1.5", "bge-base-zh-v1.5", "bge-large-zh-v1.5"]


@pytest.fixture(scope="module")
def preset_pairs():
    """(minibge, HF) pair for a preset, same random weights; large ones take a few seconds."""
    def build(name):
        config = minibge.preset(name)
        hf_model = hf_reference_model(config, seed=1)
        model = BertModel(config).eval()
        load_state_into(model, official_state_dict(hf_model))
        return model, hf_model
    return build


@pytest.mark.parametrize("name", [name if "small" in name else pytest.param(name, marks=pytest.mark.slow)
                                  for name in PRESET_SHAPES])  # base and large: the slow tier
def test_matches_transformers_on_every_preset(preset_pairs, name):
    model, hf_model = preset_pairs(name)
    ids, mask, types = random_batch(model.config, batch_size=4, seq_len=48, seed=3)
    for attn_impl in ("sdpa", "manual"):
        model.set_attn_impl(attn_impl)
        max_diff, mean_diff, cls_cos = compare_with_hf(model, hf_model, ids, mask, types)
        msg = f"{name}/{attn_impl}: max |diff| {max_diff:.3e}, mean {mean_diff:.3e}, min CLS cosine {cls_cos:.9f}"
        assert max_diff <= MAX_ABS_TOL and cls_cos >= MIN_CLS_COSINE, msg


def test_every_preset_has_a_known_shape():
    assert {dataclasses.astuple(minibge.preset(n)) for n in minibge.PRESETS} == \
        {dataclasses.astuple(minibge.preset(n)) for n in PRESET_SHAPES}


def test_preset_parameter_counts_match_official():
    # official counts (FlagEmbedding docs), pooler included
    official = {"bge-small-en-v1.5": 33_360_000, "bge-base-en-v1.5": 109_482_240, "bge-large-en-v1.5": 335_141_888,
                "bge-small-zh-v1.5": 23_953_920, "bge-base-zh-v1.5": 102_267_648, "bge-large-zh-v1.5": 325_522_432}
    for name, count in official.items():
        with torch.device("meta"):  # shapes only, no memory
            model = BertModel(minibge.preset(name))
        assert sum(p.numel() for p in model.parameters()) == count, name


@pytest.mark.parametrize("reference_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_matches_both_transformers_attention_paths(attn_impl, reference_impl):
    config = BertConfig(**TINY)
    hf_model = hf_reference_model(config, attn_implementation=reference_impl)
    model = BertModel(config, attn_impl=attn_impl).eval()
    load_state_into(model, official_state_dict(hf_model))
    for seed in range(5):
        ids, mask, types = random_batch(config, batch_size=6, seq_len=20, seed=seed)
        max_diff, mean_diff, cls_cos = compare_with_hf(model, hf_model, ids, mask, types)
        assert max_diff <= 1e-5, f"seed {seed}: max {max_diff:.3e} mean {mean_diff:.3e}"


def test_real_minilm_matches_transformers(minilm_dir):
    from transformers import AutoModel
    hf_model = AutoModel.from_pretrained(minilm_dir).eval()
    model = minibge.load_model(minilm_dir)
    for attn_impl in ("sdpa", "manual"):
        model.set_attn_impl(attn_impl)
        ids, mask, types = random_batch(model.config, batch_size=8, seq_len=128, seed=7)
        max_diff, mean_diff, cls_cos = compare_with_hf(model, hf_model, ids, mask, types)
        assert max_diff <= MAX_ABS_TOL and cls_cos >= MIN_CLS_COSINE, \
            f"{attn_impl}: max {max_diff:.3e} mean {mean_diff:.3e} cos {cls_cos:.9f}"


def test_intermediate_outputs_match_transformers(tiny_checkpoint):
    folder, hf_model = tiny_checkpoint
    model = minibge.load_model(folder)
    ids, mask, types = random_batch(model.config, batch_size=3, seq_len=16, seed=2)
    with torch.no_grad():
        out = model.inspect(ids, mask, types)
        hf_eager = hf_reference_model(model.config, attn_implementation="eager")
        hf_eager.load_state_dict(hf_model.state_dict())
        ref = hf_eager(input_ids=ids, attention_mask=mask, token_type_ids=types,
                       output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    real = mask.bool()
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert torch.allclose(a[real], b[real], atol=1e-5), f"hidden state {i}: {diff_report(a[real], b[real])}"
    for i, (a, b) in enumerate(zip(out.attentions, ref.attentions)):
        a, b = a.transpose(1, 2)[real], b.transpose(1, 2)[real]  # (tokens, heads, T): real query rows
        assert torch.allclose(a, b, atol=1e-6), f"attention {i}: {diff_report(a, b)}"
    with torch.no_grad():  # asking for attention probabilities routes through the manual path
        plain = model(ids, mask, types)
    assert torch.allclose(out.last_hidden_state, plain, atol=1e-5), diff_report(out.last_hidden_state, plain)


# -----------------------------------------------------------------------------
# Properties (hypothesis): what must hold for any input, independent of transformers

@pytest.fixture(scope="module")
def tiny_model():
    config = BertConfig(**TINY)
    model = BertModel(config).eval()
    with torch.no_grad():  # perturb LayerNorms so they are not the identity
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


token_lists = st.lists(st.integers(1, TINY["vocab_size"] - 1), min_size=1, max_size=TINY["max_position_embeddings"])


def encode_padded(model, sequences):
    T = max(len(s) for s in sequences)
    ids = torch.tensor([s + [0] * (T - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in sequences])
    with torch.no_grad():
        return model(ids, mask)


@settings(max_examples=30, deadline=None)
@given(seq=token_lists, extra_pad=st.integers(1, 16), attn_impl=st.sampled_from(["sdpa", "manual"]))
def test_padding_does_not_change_real_positions(tiny_model, seq, extra_pad, attn_impl):
    tiny_model.set_attn_impl(attn_impl)
    alone = encode_padded(tiny_model, [seq])[0]
    extra_pad = min(extra_pad, TINY["max_position_embeddings"] - len(seq))
    if extra_pad == 0:
        return
    with torch.no_grad():
        ids = torch.tensor([seq + [0] * extra_pad])
        mask = torch.tensor([[1] * len(seq) + [0] * extra_pad])
        padded = tiny_model(ids, mask)[0, :len(seq)]
    assert torch.allclose(alone, padded, atol=1e-5), diff_report(alone, padded)


@settings(max_examples=20, deadline=None)
@given(batch=st.lists(token_lists, min_size=2, max_size=6), data=st.data())
def test_output_independent_of_companions_and_order(tiny_model, batch, data):
    tiny_model.set_attn_impl("sdpa")
    order = data.draw(st.permutations(range(len(batch))))
    out = encode_padded(tiny_model, batch)
    shuffled = encode_padded(tiny_model, [batch[i] for i in order])
    for new_pos, old_pos in enumerate(order):
        n = len(batch[old_pos])
        alone = encode_padded(tiny_model, [batch[old_pos]])[0]
        for other in (out[old_pos, :n], shuffled[new_pos, :n]):
            assert torch.allclose(alone, other, atol=1e-5), diff_report(alone, other)


@settings(max_examples=20, deadline=None)
@given(batch=st.lists(token_lists, min_size=1, max_size=5))
def test_sdpa_equals_manual(tiny_model, batch):
    outs = {}
    for impl in ("sdpa", "manual"):
        tiny_model.set_attn_impl(impl)
        outs[impl] = encode_padded(tiny_model, batch)
    T = outs["sdpa"].shape[1]
    real = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in batch]).bool()
    a, b = outs["sdpa"][real], outs["manual"][real]
    assert torch.allclose(a, b, atol=1e-5), diff_report(a, b)


def test_no_mask_equals_all_ones_mask(tiny_model):
    ids, _, _ = random_batch(tiny_model.config, 3, 10)
    ids = ids.clamp(min=1)
    with torch.no_grad():
        assert torch.equal(tiny_model(ids), tiny_model(ids, torch.ones_like(ids)))


# -----------------------------------------------------------------------------
# Bad input → a clear exception

@pytest.mark.parametrize("make_input, match", [
    (lambda c: dict(input_ids=torch.tensor([[1, c.vocab_size]])), "token ids must lie in"),
    (lambda c: dict(input_ids=torch.tensor([[1, -1]])), "token ids must lie in"),
    (lambda c: dict(input_ids=torch.ones(1, c.max_position_embeddings + 1, dtype=torch.long)), "max_position_embeddings"),
    (lambda c: dict(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4)), "attention_mask must be a tensor with the shape"),
    (lambda c: dict(input_ids=torch.ones(2, 5, dtype=torch.long), token_type_ids=torch.full((2, 5), 2)), "token_type_ids must lie in"),
    (lambda c: dict(input_ids=torch.ones(5, dtype=torch.long)), "2-D torch.long"),
    (lambda c: dict(input_ids=torch.ones(1, 5)), "2-D torch.long"),
])
def test_bad_inputs_raise_value_error(tiny_model, make_input, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(**make_input(tiny_model.config))


def test_pooler_output_matches_transformers(tiny_checkpoint):
    folder, hf_model = tiny_checkpoint
    model = minibge.load_model(folder)
    ids, mask, types = random_batch(model.config, batch_size=3, seq_len=12, seed=4)
    with torch.no_grad():
        ours = model.pooler_output(model(ids, mask, types))
        ref = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
    assert torch.allclose(ours, ref, atol=1e-6), diff_report(ours, ref)
    with pytest.raises(ValueError, match="no pooler"):
        BertModel(model.config, add_pooler=False).pooler_output(ours[:, None])


def test_forward_always_returns_the_last_hidden_state(tiny_model):
    ids, mask, types = random_batch(tiny_model.config, 3, 9, seed=8)
    with torch.no_grad():
        out = tiny_model(ids, mask, types)
        details = tiny_model.inspect(ids, mask, types)
        first = tiny_model(ids[:1], mask[:1], types[:1])[0]
    assert isinstance(out, torch.Tensor) and out.shape == (3, 9, TINY["hidden_size"])
    assert torch.allclose(out[0], first, atol=1e-5), f"model(...)[0] is the first sequence: {diff_report(out[0], first)}"
    assert len(details.hidden_states) == TINY["num_hidden_layers"] + 1 and len(details.attentions) == TINY["num_hidden_layers"]
    assert torch.equal(details.last_hidden_state, details.hidden_states[-1])


# -----------------------------------------------------------------------------
# The research hook: an additive attention-score bias, the same on both paths

def alibi_bias(num_heads, T):
    """ALiBi-style symmetric distance penalty, one slope per head: (1, heads, T, T)."""
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / num_heads) for h in range(num_heads)])
    distance = (torch.arange(T)[None, :] - torch.arange(T)[:, None]).abs()
    return -(slopes[:, None, None] * distance)[None]


@settings(max_examples=15, deadline=None)
@given(batch=st.lists(token_lists, min_size=1, max_size=4), per_sentence=st.booleans())
def test_attention_bias_same_on_both_paths(tiny_model, batch, per_sentence):
    T = max(len(s) for s in batch)
    ids = torch.tensor([s + [0] * (T - len(s)) for s in batch])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in batch])
    heads = TINY["num_attention_heads"]
    bias = torch.randn(len(batch), heads, T, T) if per_sentence else alibi_bias(heads, T)
    outs = {}
    with torch.no_grad():
        for impl in ("sdpa", "manual"):
            tiny_model.set_attn_impl(impl)
            outs[impl] = tiny_model(ids, mask, attention_bias=bias)
        plain = tiny_model(ids, mask)
    real = mask.bool()
    a, b = outs["sdpa"][real], outs["manual"][real]
    assert torch.allclose(a, b, atol=1e-5), diff_report(a, b)
    assert not torch.allclose(a, plain[real], atol=1e-4) or T == 1, "the bias changed nothing"


def test_zero_attention_bias_is_a_no_op(tiny_model):
    ids, mask, _ = random_batch(tiny_model.config, 3, 10, seed=3)
    with torch.no_grad():
        for impl in ("sdpa", "manual"):
            tiny_model.set_attn_impl(impl)
            a, b = tiny_model(ids, mask), tiny_model(ids, mask, attention_bias=torch.zeros(1, 1, 10, 10))
            assert torch.allclose(a, b, atol=1e-6), f"{impl}: {diff_report(a, b)}"


# -----------------------------------------------------------------------------
# attention_mask: 0/1 only

@pytest.mark.parametrize("make_mask, match", [
    (lambda m: (1 - m).float() * -10000.0, "additive mask"),                # transformers' extended mask, float
    (lambda m: (1 - m) * -10000, "additive mask"),                          # the same as integers
    (lambda m: (1 - m).float() * torch.finfo(torch.float32).min, "additive mask"),
    (lambda m: m * 2, "only 0 and 1"),
    (lambda m: m.float(), "bool or integer"),
    (lambda m: m.float() * 0.5, "bool or integer"),
    (lambda m: m.tolist(), "must be a tensor"),
])
def test_bad_attention_masks_raise_value_error(tiny_model, make_mask, match):
    ids, mask, _ = random_batch(tiny_model.config, 3, 8, seed=9)
    with pytest.raises(ValueError, match=match):
        tiny_model(ids, make_mask(mask))


def test_good_attention_masks_agree(tiny_model):
    ids, mask, _ = random_batch(tiny_model.config, 3, 8, seed=9)
    with torch.no_grad():
        outs = [tiny_model(ids, m) for m in (mask, mask.bool(), mask.int(), mask.to(torch.uint8))]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_bad_config_values():
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="swish")
    with pytest.raises(ValueError, match="attn_impl"):
        BertModel(BertConfig(**TINY), attn_impl="flash")
