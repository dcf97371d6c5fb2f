"""minibge.onednn computes F.linear: its value and all three gradients, for any shape, and a whole
BertModel switched to it trains like the plain model (and like transformers).

The differences are float rounding: oneDNN and MKL sum the products in different orders. I compare
relative to the size of the values compared (max |diff| ≤ 1e-5 · max |reference|), because
an absolute bar would be too loose for small outputs and too strict for large ones.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TINY, gradient_errors, random_batch, training_pair
from hypothesis import given, settings
from hypothesis import strategies as st

from minibge import BertConfig, BertModel
from minibge.fast import onednn

from test_gradients import MAX_RELATIVE_GRAD_ERROR, no_dropout

RELATIVE_TOLERANCE = 1e-5
needs_onednn = pytest.mark.skipif(not onednn.available(torch.zeros(1)),
                                  reason="this torch build has no working mkldnn::_linear_pointwise")


def assert_close(ours, ref, what):
    """max |ours − ref| ≤ RELATIVE_TOLERANCE × max |ref|, with both differences in the message."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)}, expected {tuple(ref.shape)}"
    diff = (ours.double() - ref.double()).abs()
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    if diff.numel():
        assert diff.max() <= RELATIVE_TOLERANCE * max(scale, 1e-30), \
            f"{what}: max |diff| {diff.max():.3e}, mean |diff| {diff.mean():.3e}, max |reference| {scale:.3e}"


def make_input(lead: tuple, in_features: int, layout: str, generator) -> torch.Tensor:
    """x of shape (*lead, in): row-major, a transposed view (3-D only), or every other row of a bigger tensor."""
    if layout == "transposed" and len(lead) == 2:
        return torch.randn(lead[1], lead[0], in_features, generator=generator).transpose(0, 1)
    if layout == "sliced":
        return torch.randn(*lead[:-1], 2 * lead[-1], in_features, generator=generator)[..., ::2, :]
    return torch.randn(*lead, in_features, generator=generator)


def grad_output_of(y: torch.Tensor, kind: str, generator) -> torch.Tensor:
    """A scalar whose gradient w.r.t. y is row-major ("weighted"), expanded with stride 0 ("sum"),
    or a transposed, non-contiguous tensor ("transposed")."""
    if kind == "sum":
        return y.sum()
    if kind == "transposed" and y.dim() == 3:
        weights = torch.randn(y.shape[1], y.shape[0], y.shape[2], generator=generator)
        return (y.transpose(0, 1) * weights).sum()
    return (y * torch.randn(y.shape, generator=generator)).sum()


def forward_backward(fn, x, weight, bias, loss_kind, seed):
    """fn's output and the gradients of a loss on it (None where no gradient was asked for)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in (x, weight, bias)]
    y = fn(*leaves)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(grad_output_of(y, loss_kind, torch.Generator().manual_seed(seed)), wanted)
    it = iter(grads)
    return y.detach(), [next(it) if t is not None and t.requires_grad else None for t in leaves]


# -----------------------------------------------------------------------------
# One Linear: oneDNN against F.linear

@needs_onednn
@settings(max_examples=60, deadline=None)
@given(lead=st.lists(st.integers(1, 7), min_size=1, max_size=2).map(tuple), in_features=st.integers(1, 48),
       out_features=st.integers(1, 48), with_bias=st.booleans(), x_grad=st.booleans(), w_grad=st.booleans(),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       loss_kind=st.sampled_from(["weighted", "sum", "transposed"]), seed=st.integers(0, 10_000))
def test_linear_function_equals_f_linear(lead, in_features, out_features, with_bias, x_grad, w_grad, layout,
                                         loss_kind, seed):
    generator = torch.Generator().manual_seed(seed)
    x = make_input(lead, in_features, layout, generator).requires_grad_(x_grad)
    weight = torch.randn(out_features, in_features, generator=generator).requires_grad_(w_grad)
    bias = torch.randn(out_features, generator=generator).requires_grad_(True) if with_bias else None
    if not (x_grad or w_grad or with_bias):
        x.requires_grad_(True)  # something must need a gradient
    what = f"x {tuple(x.shape)} ({layout}), W {tuple(weight.shape)}, bias {with_bias}, loss {loss_kind}"

    ref_y, ref_grads = forward_backward(F.linear, x, weight, bias, loss_kind, seed)
    y, grads = forward_backward(onednn.LinearFunction.apply, x, weight, bias, loss_kind, seed)
    assert_close(y, ref_y, f"{what}: output")
    with torch.no_grad():
        assert_close(onednn.linear(x, weight, bias), ref_y, f"{what}: linear()")
    for name, ours, ref in zip(("∂x", "∂W", "∂b"), grads, ref_grads):
        assert (ours is None) == (ref is None), f"{what}: {name} computed by one side only"
        if ref is not None:
            assert_close(ours, ref, f"{what}: {name}")


@needs_onednn
@pytest.mark.parametrize("post_op", ["none", "gelu", "residual"])
def test_linear_post_ops_and_empty_inputs(post_op):
    generator = torch.Generator().manual_seed(0)
    for rows, in_features in [(9, 12), (0, 12), (9, 0)]:  # an empty batch, and an empty product (in = 0)
        x, weight, bias, residual = (torch.randn(*shape, generator=generator)
                                     for shape in ((rows, in_features), (5, in_features), (5,), (rows, 5)))
        residual = residual if post_op == "residual" else None
        reference = F.linear(x, weight, bias)
        if post_op == "gelu":
            reference = F.gelu(reference)
        elif post_op == "residual":
            reference = reference + residual
        ours = onednn.linear(x, weight, bias, gelu=post_op == "gelu", residual=residual)
        assert_close(ours, reference, f"{post_op}, x {tuple(x.shape)}")
        if in_features:  # a weight packed once into oneDNN's layout gives the same numbers
            packed = onednn.pack_weight(weight)
            ours = onednn.linear(x, weight, bias, gelu=post_op == "gelu", residual=residual, packed=packed)
            assert_close(ours, reference, f"{post_op}, x {tuple(x.shape)}, packed weight")


@needs_onednn
def test_empty_batch_gets_zero_weight_gradients():
    x = torch.zeros(0, 6, requires_grad=True)
    layer = onednn.Linear(6, 3)
    layer(x).sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(3, 6)) and torch.equal(layer.bias.grad, torch.zeros(3))


@needs_onednn
def test_double_backward_is_refused_not_silently_zero():
    x = torch.randn(4, 5, requires_grad=True)
    layer = onednn.Linear(5, 3)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_fall_back_to_f_linear(dtype):
    torch.manual_seed(0)
    layer = onednn.Linear(8, 4).to(dtype)
    x = torch.randn(3, 2, 8, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert "LinearFunction" not in type(y.grad_fn).__name__, f"{dtype} went through oneDNN"
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias)), f"{dtype}: not F.linear's result"


def test_bf16_is_taken_only_when_asked_for_and_multiplied_in_hardware(monkeypatch):
    """The fast path's bf16 products (bf16=True) take oneDNN on a CPU with native bf16; training's
    Linear (bf16 left out) never does, and an emulating CPU never does."""
    x = torch.randn(6, 16).bfloat16()
    assert not onednn.available(x), "bf16 without bf16=True"
    if onednn.available(x, bf16=True):
        w, b = torch.randn(8, 16).bfloat16(), torch.randn(8).bfloat16()
        y = onednn.linear(x, w, b, gelu=True, packed=onednn.pack_weight(w))
        reference = F.gelu(F.linear(x.float(), w.float(), b.float()))
        assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), reference, rtol=0.02, atol=0.05), \
            f"bf16 oneDNN vs fp32: max |diff| {(y.float() - reference).abs().max():.3e}"
    monkeypatch.setattr(onednn, "cpu_has_native_bf16", lambda: False)
    onednn._bf16_op_works.cache_clear()
    try:
        assert not onednn.available(x, bf16=True), "bf16 taken on a CPU that would emulate it"
    finally:
        monkeypatch.undo()
        onednn._bf16_op_works.cache_clear()


@needs_onednn
def test_cpu_autocast_falls_back_to_f_linear():
    # under autocast F.linear runs in bf16; the oneDNN operator would silently stay fp32
    layer, x = onednn.Linear(8, 4), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == torch.bfloat16 and torch.equal(y, F.linear(x, layer.weight, layer.bias))
    assert "LinearFunction" in type(layer(x.requires_grad_()).grad_fn).__name__, "fp32 outside autocast: oneDNN"


# -----------------------------------------------------------------------------
# Switching a model's Linears

def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return BertModel(no_dropout(BertConfig(**TINY))).train()


def test_switch_keeps_parameters_and_state_dict_and_is_reversible():
    model = tiny_bert()
    plain = sum(type(m) is nn.Linear for m in model.modules())
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert onednn.use_onednn_linears(model) == plain > 0
    assert all(type(m) is not nn.Linear for m in model.modules()), "a plain nn.Linear was left"
    assert all(p is params[name] for name, p in model.named_parameters()), "parameters must be the same tensors"
    assert list(model.state_dict()) == keys, "state_dict keys changed"
    assert onednn.use_onednn_linears(model) == 0, "switching twice switches nothing"
    assert onednn.use_onednn_linears(model, enable=False) == plain
    assert sum(type(m) is nn.Linear for m in model.modules()) == plain
    assert all(p is params[name] for name, p in model.named_parameters())


def test_context_restores_only_what_it_switched_even_on_errors():
    model = tiny_bert()
    onednn.use_onednn_linears(model.pooler)  # switched by the caller before: must stay switched
    with pytest.raises(KeyError):
        with onednn.onednn_linears(model) as switched:
            assert switched == sum(isinstance(m, nn.Linear) for m in model.modules()) - 1
            assert type(model.layers[0].feed_forward.up) is onednn.Linear
            raise KeyError("training crashed")
    assert type(model.layers[0].feed_forward.up) is nn.Linear and type(model.pooler.dense) is onednn.Linear


@needs_onednn
@pytest.mark.parametrize("checkpointing", [False, True])
def test_bert_model_on_onednn_trains_like_the_plain_model(checkpointing):
    plain, switched = tiny_bert(), tiny_bert()
    switched.load_state_dict(plain.state_dict())
    onednn.use_onednn_linears(switched)
    if checkpointing:  # recomputation in backward must go through the same Function
        switched.gradient_checkpointing = True
    for seed in range(3):
        ids, mask, types = random_batch(plain.config, 5, 24, seed=seed)
        outputs = []
        for model in (plain, switched):
            model.zero_grad(set_to_none=True)
            hidden = model(ids, mask, types)
            (hidden[mask.bool()].square().mean() + model.pooler_output(hidden).sum()).backward()
            outputs.append(hidden.detach())
        real = mask.bool()
        assert_close(outputs[1][real], outputs[0][real], f"seed {seed}: last hidden state")
        grads = {name: (p.grad, q.grad) for (name, p), q in zip(plain.named_parameters(), switched.parameters())}
        for name, (ref, ours) in grads.items():
            # the key bias's true gradient is 0 (see conftest.gradient_errors): measured against the key weight's
            scale = grads[name.replace(".bias", ".weight")][0] if name.endswith("attention.key.bias") else ref
            error = ((ours - ref).norm() / scale.norm().clamp(min=1e-30)).item()
            assert error <= MAX_RELATIVE_GRAD_ERROR, \
                f"seed {seed}, {name}: relative gradient error {error:.3e}, max |diff| {(ours - ref).abs().max():.3e}"
    assert any(type(m) is onednn.Linear for m in switched.modules())


@needs_onednn
def test_bert_model_on_onednn_matches_transformers_gradients():
    # the bar and the loss of test_gradients.py, with the minibge side on oneDNN
    config = no_dropout(BertConfig(**TINY))
    model, hf_model = training_pair(config)
    onednn.use_onednn_linears(model)
    for attn_impl in ("sdpa", "manual"):
        model.set_attn_impl(attn_impl)
        errors = gradient_errors(model, hf_model, *random_batch(config, 5, 24, seed=1))
        worst = max(errors, key=errors.get)
        assert errors[worst] <= MAX_RELATIVE_GRAD_ERROR, \
            f"{attn_impl}: worst relative gradient error {errors[worst]:.3e} in {worst}; " \
            f"mean over {len(errors)} tensors {sum(errors.values()) / len(errors):.3e}"


@needs_onednn
def test_retromae_head_follows_its_dense_layer_onto_onednn():
    # the vocabulary projection is an nn.Linear tied to the embedding table: the switch reaches it like any Linear
    from minibge.retromae import MLMHead

    config = BertConfig(**TINY)
    generator = torch.Generator().manual_seed(1)
    table = torch.randn(config.vocab_size, config.hidden_size, generator=generator)
    hidden = torch.randn(2, 7, config.hidden_size, generator=generator)
    tables = [nn.Embedding.from_pretrained(table.clone(), freeze=False) for _ in range(2)]
    torch.manual_seed(0)
    plain = MLMHead(config, tables[0])
    switched = MLMHead(config, tables[1])
    switched.load_state_dict(plain.state_dict())
    onednn.use_onednn_linears(switched)
    results = []
    for head, table_module in zip((plain, switched), tables):
        hidden_leaf = hidden.clone().requires_grad_()
        logits = head(hidden_leaf)
        logits.logsumexp(dim=-1).sum().backward()
        results.append({"logits": logits.detach(), "∂table": table_module.weight.grad, "∂hidden": hidden_leaf.grad,
                        "∂bias": head.bias.grad, "∂dense": head.dense.weight.grad})
        grad_fn = type(logits.grad_fn).__name__
    assert "LinearFunction" in grad_fn, f"the switched head's vocabulary projection ran {grad_fn}"
    for name, ref in results[0].items():
        assert_close(results[1][name], ref, name)


# -----------------------------------------------------------------------------
# Importing minibge changes no environment variable; the first oneDNN work caps the kernel caches

def test_import_changes_no_environment_variable():
    script = "import os; before = dict(os.environ); import minibge; assert dict(os.environ) == before"
    environment = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                                                                        "LRU_CACHE_CAPACITY")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_first_onednn_work_caps_the_caches_and_a_user_value_wins():
    script = textwrap.dedent("""
        import os, torch
        from minibge.fast import onednn
        assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
        onednn.available(torch.zeros(1))
        print(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"), os.environ.get("LRU_CACHE_CAPACITY"))
    """)
    environment = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    environment["LRU_CACHE_CAPACITY"] = "7"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reaches_the_op = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    assert result.stdout.split()[-2:] == (["64", "7"] if reaches_the_op else ["None", "7"])
