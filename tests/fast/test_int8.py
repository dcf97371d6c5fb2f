"""fast/int8.py: per-channel × per-token int8 matmuls, against F.linear."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minibge.fast.int8 import Int8Linear, load_calibration, quantize_rows, quantize_rows_asymmetric, save_calibration


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 40), features=st.integers(1, 70), out=st.integers(1, 50), seed=st.integers(0, 10**6),
       shift=st.floats(-3, 3))
def test_int8_linear_is_close_to_f_linear(rows, features, out, seed, shift):
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(features, out)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out, features, generator=g))
        linear.bias.copy_(torch.randn(out, generator=g))
    x = torch.randn(rows, features, generator=g) + shift  # shifted: the per-token offset must carry it
    got, ref = Int8Linear(linear)(x), F.linear(x, linear.weight, linear.bias)
    assert got.shape == ref.shape and got.dtype == torch.float32
    if rows:
        # each product's error is bounded by the two rounding steps: ≤ ½ level of x times Σ|W| plus
        # ½ level of W times Σ|x|, per output; I check a looser, scale-free bound
        err = (got - ref).abs().max() / (x.abs().amax(1, keepdim=True) * linear.weight.abs().sum(1)).max()
        assert err < 2e-2, f"max error relative to Σ|x||W|: {err:.2e}"


def test_quantisers_round_trip_within_half_a_level():
    x = torch.randn(7, 33) * torch.tensor([0.01, 1.0, 100.0, 1.0, 1.0, 1.0, 1.0])[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and ((q.float() * scale - x).abs() <= scale / 2 + 1e-6).all()
    q, scale, offset = quantize_rows_asymmetric(x.relu())
    assert q.dtype == torch.int8 and ((q.float() * scale + offset - x.relu()).abs() <= scale / 2 + 1e-5).all()
    assert q.min() == -128 and q.max() == 127, "a row's range uses all 256 levels"


def test_zero_rows_and_a_constant_row():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4)
    x = torch.zeros(3, 8)
    x[1] = 2.5
    layer = Int8Linear(linear)
    got, ref = layer(x), F.linear(x, linear.weight, linear.bias)
    # a zero or constant row is represented exactly (its offset is the value), so what is left is the
    # weights' rounding: at most half a step s_w[j] per input, Σ_k |x[n, k]| · s_w[j] / 2
    bound = x.abs().sum(dim=1, keepdim=True) * layer.weight_scale / 2 + 1e-5     # (3, 4)
    diff = (got - ref).abs()
    assert (diff <= bound).all(), f"max |diff| {diff.max():.3e} over a bound of {bound.max():.3e}"
    assert diff[[0, 2]].max() < 1e-6, "an all-zero row gives the bias"


def test_int8_linear_refuses_nothing_and_keeps_no_gradient():
    layer = Int8Linear(torch.nn.Linear(5, 3))
    assert not list(layer.parameters()), "a frozen copy: no parameters for an optimizer to find"
    with pytest.raises(RuntimeError):
        layer(torch.randn(2, 4))  # wrong width: torch's own error


def outlier_batch(seed=0, rows=64, features=48):
    """Activations with two channels ~30× the rest in every token, as BERT's hidden states have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    x[:, [3, 17]] *= 30
    return x, g


def test_smoothing_moves_outlier_channels_into_the_weight():
    x, g = outlier_batch()
    linear = torch.nn.Linear(x.shape[1], 20)
    ref = F.linear(x, linear.weight, linear.bias)
    plain = Int8Linear(linear)(x)
    smooth_layer = Int8Linear(linear, activation_max=x.abs().amax(dim=0))
    smooth = smooth_layer(x)
    err = lambda y: (y - ref).abs().mean().item()
    assert err(smooth) < 0.5 * err(plain), f"mean |error|: smoothed {err(smooth):.4f}, plain {err(plain):.4f}"
    assert "smoothed" in repr(smooth_layer) and "smoothed" not in repr(Int8Linear(linear))
    with pytest.raises(ValueError, match=r"activation_max has shape \(5,\), expected \(48,\)"):
        Int8Linear(linear, activation_max=torch.ones(5))


def test_calibration_file_round_trip_and_refusals(tmp_path):
    calibration = {"0.qkv": torch.rand(8), "1.down": torch.rand(32)}
    path = save_calibration(calibration, tmp_path / "int8.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["int8.safetensors"], "a temporary file was left behind"
    loaded = load_calibration(path, num_layers=2)
    assert set(loaded) == set(calibration) and all(torch.equal(loaded[k], calibration[k]) for k in calibration)
    bad = {"2.qkv": torch.rand(8)}, {"0.attention": torch.rand(8)}, {"0.up": torch.rand(2, 8)}, {"0.up": -torch.rand(8)}, \
        {"0.up": torch.tensor([1.0, float("nan")])}
    for i, entries in enumerate(bad):
        with pytest.raises(ValueError, match="int8|entry|maxima"):
            load_calibration(save_calibration(entries, tmp_path / f"bad{i}.safetensors"), num_layers=2)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable int8 calibration file"):
        load_calibration(tmp_path / "junk.safetensors", num_layers=2)


def test_int8_linear_answers_in_the_input_dtype():
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    for layer in (Int8Linear(linear), Int8Linear(linear, activation_max=x.abs().amax(dim=0))):
        got = layer(x.bfloat16())
        assert got.dtype == torch.bfloat16 and got.shape == (3, 8)
