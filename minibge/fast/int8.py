"""int8 matmuls that keep the scores: one scale per weight row, one scale per token, integer products.

A Linear y = x Wᵀ + b in int8 replaces each float by a small integer times a scale. How many
scales there are decides how much is lost:

    per tensor (PyTorch's dynamic quantisation)   one scale for all of W, one for the whole batch x:
                                                  a single large activation (BERT has a few, in fixed
                                                  channels) squeezes every other token into a few levels
    per channel × per token (this file)           s_w[j] = max|W[j, :]| / 127 for each output row j
                                                  (symmetric), and for each token n its own range
                                                  [lo_n, hi_n] in 256 levels: s_x[n] = (hi_n − lo_n)/255

so that, with c[n] = lo_n + 128 · s_x[n] (the value the integer 0 stands for),

    x[n, k] ≈ s_x[n] · q_x[n, k] + c[n]     W[j, k] ≈ s_w[j] · q_w[j, k]      (q_x in [-128, 127], q_w in [-127, 127])
    y[n, j] = Σ_k x[n, k] W[j, k] ≈ s_x[n] · s_w[j] · Σ_k q_x[n, k] q_w[j, k]  +  c[n] · Σ_k W[j, k]  +  b[j]

The sum is an integer product (int8 × int8 → int32, `torch._int_mm`, which runs on the CPU's VNNI
or AMX-INT8 units), and the scales factor out of it because each is constant along k; the second
term is an outer product with the weight's row sums, computed once. Why a range per token rather
than ±max: GELU's outputs (the input of the down-projection) are almost all ≥ 0, so a symmetric
range would waste half of the 256 levels. The weight is quantised once, when the fast encoder
builds its matmuls; each batch's activations are quantised as they come. Rounding is to nearest.

Smoothing (optional, SmoothQuant, Xiao et al. 2023). A token's range is set by its largest entry,
and in BERT a few *channels* k carry entries far larger than the rest (in every token), so the
other channels of that token get few levels. Since y = x Wᵀ = (x / s)(W · s)ᵀ for any positive
s[k], I can move part of each channel's range from the activation into the weight, which has a
scale per output row and is quantised once, offline:

    s[k] = max|x[:, k]|^α / max|W[:, k]|^(1−α)       α = 0.5 (the paper's default)

max|x[:, k]| is measured on a few hundred calibration texts (`calibrate`), stored as a plain
{name: (in,) tensor} dict (save_calibration / load_calibration, safetensors). The 1/s multiply is
one more elementwise step before the quantisation, which torch.compile fuses into it.

What it costs in accuracy and gains in speed is measured in docs/benchmarks.md (1 − cos against
float32 and the STS-B score beside the speed); tests/ check the error bound.
"""
from pathlib import Path

import torch
import torch.nn as nn

from ..common import atomic_path

LEVELS = 127  # symmetric int8: -127..127 (leaving -128 out keeps the range symmetric)
SMOOTHING_ALPHA = 0.5  # SmoothQuant's default balance between activation and weight ranges
MATMULS = ("qkv", "output", "up", "down")  # a block's matmuls, as a calibration names them ("<layer>.<matmul>")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float → (N, K) int8 and (N, 1) float scales, symmetric per row: x ≈ scale · q."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / LEVELS  # (N, 1); an all-zero row stays 0
    return torch.round(x / scale).to(torch.int8), scale


def quantize_rows_asymmetric(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float → (N, K) int8, (N, 1) scales and (N, 1) offsets: x ≈ scale · q + offset, each row's
    [min, max] spread over all 256 levels."""
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)        # (N, 1) each
    scale = (hi - lo).clamp(min=1e-12) / 255
    q = (torch.round((x - lo) / scale) - 128).to(torch.int8)                  # 0..255 shifted to -128..127
    return q, scale, lo + 128 * scale


def smoothing_factors(activation_max: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTHING_ALPHA):
    """(in,) s with x / s and W · s sharing each input channel's range (module docstring)."""
    weight_max = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)       # (in,)
    return activation_max.float().clamp(min=1e-5) ** alpha / weight_max ** (1 - alpha)


class Int8Linear(nn.Module):
    """A frozen copy of an nn.Linear computing x Wᵀ + b with int8 products (module docstring).
    activation_max: (in,) max |x| per input channel from calibration, to smooth with; None: no
    smoothing. Inference only: it has no parameters and no gradient."""

    def __init__(self, linear: nn.Linear, activation_max: torch.Tensor | None = None):
        super().__init__()
        weight = linear.weight.detach().float()
        if activation_max is not None:
            if activation_max.shape != (linear.in_features,):
                raise ValueError(f"activation_max has shape {tuple(activation_max.shape)}, "
                                 f"expected ({linear.in_features},) for this Linear")
            smooth = smoothing_factors(activation_max, weight)                  # (in,)
            weight = weight * smooth                                            # W · s, column by column
            self.register_buffer("inverse_smooth", 1 / smooth)
        else:
            self.register_buffer("inverse_smooth", None)
        q, scale = quantize_rows(weight)                                    # (out, in) int8, (out, 1)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", q.t().contiguous())                # (in, out): _int_mm's right operand
        self.register_buffer("weight_scale", scale.squeeze(1))              # (out,)
        self.register_buffer("weight_sum", (q.float() * scale).sum(dim=1))  # (out,) Σ_k W[j, k], as quantised
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).float()
        if self.inverse_smooth is not None:
            x = x * self.inverse_smooth                             # x / s
        q, scale, offset = quantize_rows_asymmetric(x)            # (N, in) int8, (N, 1) scales and offsets
        y = torch._int_mm(q, self.weight_t).float()               # (N, out): the integer product, exact in int32
        # in place, one pass each over (N, out): on long batches these passes, not the product, are the cost
        y.mul_(self.weight_scale).mul_(scale)                     # · s_w[j] · s_x[n]
        y.addr_(offset.squeeze(1), self.weight_sum)               # + c[n] · Σ_k W[j, k] (a rank-1 update)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        smoothed = ", smoothed" if self.inverse_smooth is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, per-channel × per-token int8{smoothed}"


# -----------------------------------------------------------------------------
# Calibration: max |x| per input channel of every matmul, on a few hundred texts

def calibrate(embedder, texts) -> dict[str, torch.Tensor]:
    """{"<layer>.<matmul>": (in,) max |x|} for the input of each block's MATMULS,
    over the real tokens of `texts`. Forward hooks on the model's own Linears record them; hooks
    make encode() take the plain model (fast/encoder.py's model_blocker), and batch_size=1 leaves
    no padding rows to pollute the maxima."""
    texts = list(texts)
    if not texts:
        raise ValueError("int8 calibration needs some texts (a few hundred like the ones you will encode)")
    found, hooks = {}, []

    def record(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0).float()  # (in,)
            found[name] = torch.maximum(found[name], x) if name in found else x
        return hook

    for i, block in enumerate(embedder.model.layers):
        # the query's input is the key's and the value's too: one maximum serves the fused QKV
        inputs = (block.attention.query, block.attention.output, block.feed_forward.up, block.feed_forward.down)
        for name, linear in zip(MATMULS, inputs):
            hooks.append(linear.register_forward_hook(record(f"{i}.{name}")))
    try:
        embedder.encode(texts, batch_size=1, show_progress_bar=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: x.cpu() for name, x in found.items()}


def save_calibration(calibration: dict[str, torch.Tensor], path) -> Path:
    """Write a calibrate() dict as safetensors, through a temporary file renamed into place."""
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({name: x.contiguous() for name, x in calibration.items()}, str(tmp))
    return Path(path)


def load_calibration(path, num_layers: int) -> dict[str, torch.Tensor]:
    """Read a save_calibration file, checked: only "<layer>.<one of MATMULS>" keys of 1-D
    finite, non-negative float tensors for layers < num_layers (anything else: one ValueError)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        calibration = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{path} is not a readable int8 calibration file ({err})") from None
    names = {f"{i}.{name}" for i in range(num_layers) for name in MATMULS}
    for name, x in calibration.items():
        if name not in names:
            raise ValueError(f"{path}: unexpected entry {name!r} (expected <layer>.<{'|'.join(MATMULS)}>, "
                             f"layer < {num_layers})")
        if x.ndim != 1 or not x.is_floating_point() or not bool(torch.isfinite(x).all()) or bool((x < 0).any()):
            raise ValueError(f"{path}: {name!r} must be a 1-D tensor of finite maxima ≥ 0")
    return calibration
