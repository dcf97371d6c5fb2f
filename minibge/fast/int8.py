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
builds its matmuls; each batch's activations are quantised as they come (dynamic: no calibration
set, nothing to store with the model). Rounding is to nearest.

What it costs in accuracy and gains in speed is measured in docs/benchmarks.md (1 − cos against
float32 and the STS-B score beside the speed); tests/ check the error bound.
"""
import torch
import torch.nn as nn

LEVELS = 127  # symmetric int8: -127..127 (leaving -128 out keeps the range symmetric)


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


class Int8Linear(nn.Module):
    """A frozen copy of an nn.Linear computing x Wᵀ + b with int8 products (module docstring).
    Inference only: it has no parameters and no gradient."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        q, scale = quantize_rows(weight)                                    # (out, in) int8, (out, 1)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", q.t().contiguous())                # (in, out): _int_mm's right operand
        self.register_buffer("weight_scale", scale.squeeze(1))              # (out,)
        self.register_buffer("weight_sum", (q.float() * scale).sum(dim=1))  # (out,) Σ_k W[j, k], as quantised
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        q, scale, offset = quantize_rows_asymmetric(x.reshape(-1, self.in_features).float())  # (N, in), (N, 1) × 2
        y = torch._int_mm(q, self.weight_t).float()               # (N, out): the integer product, exact in int32
        # in place, one pass each over (N, out): on long batches these passes, not the product, are the cost
        y.mul_(self.weight_scale).mul_(scale)                     # · s_w[j] · s_x[n]
        y.addr_(offset.squeeze(1), self.weight_sum)               # + c[n] · Σ_k W[j, k] (a rank-1 update)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, per-channel × per-token int8"
