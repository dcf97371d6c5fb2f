"""fp32 Linear layers through oneDNN instead of the BLAS that PyTorch's CPU wheels link (MKL).

Why this file exists: on the AMD EPYC development machine, PyTorch sends an fp32 `nn.Linear`
to MKL's sgemm, which reached 190 GFLOP/s on 2 cores, while oneDNN, the other matmul library
inside the same wheel, reached 420-460 GFLOP/s on BERT's shapes (docs/benchmarks.md, "Matmul
libraries"). The function computed is the same Linear; only the kernel differs.

The kernel is `torch.ops.mkldnn._linear_pointwise(x, W, b, post_op, scalars, algorithm)`, the
fused linear that PyTorch's Inductor emits for CPUs: dense fp32 in, dense out, y = x Wᵀ + b,
optionally followed by a post-op (exact GELU) inside the same kernel, or with a residual added
(`.binary(x, residual, W, b, "add")`). It is a private operator, so `available()` checks that it
exists and agrees with F.linear before anything uses it, and everything falls back to F.linear
when it does not (other devices, other dtypes, other builds).

It has no autograd formula; `LinearFunction` supplies one, so training can use it too:

    y = x Wᵀ + b     →    ∂x = g W,   ∂W = gᵀ x,   ∂b = Σ_rows g

and each of those matmuls is again a `linear` (a (rows, out)·(out, in) product is linear(g, Wᵀ)).
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


@functools.cache
def _op_works() -> bool:
    """The operator exists in this build and gives F.linear's numbers on a small problem."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=generator) for shape in ((5, 16), (8, 16), (8,)))
    try:
        with torch.no_grad():
            y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
            y_gelu = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
    except RuntimeError:
        return False
    reference = F.linear(x, w, b)
    return torch.allclose(y, reference, atol=1e-5) and torch.allclose(y_gelu, F.gelu(reference), atol=1e-5)


def available(tensor: torch.Tensor) -> bool:
    """oneDNN's linear can take this activation/weight: fp32 on the CPU, with a working operator."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32 and _op_works()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) → (..., out) = x Wᵀ + b, then exact GELU (gelu=True) or + residual, in one kernel.

    No autograd (see LinearFunction); callers check available() first. Inputs must be dense and
    row-major: oneDNN rejects a transposed view, so I make them contiguous (a no-op when they are).
    """
    assert not (gelu and residual is not None), "one post-op at a time"
    x, weight = x.contiguous(), weight.contiguous()
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), weight, bias, "add")
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")  # "none": erf, not tanh
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class LinearFunction(torch.autograd.Function):
    """F.linear's forward and backward, each matmul through oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        g = grad_output.reshape(-1, weight.shape[0])                                  # (N, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = linear(g, weight.t()).view(x.shape)                              # (N, out)(out, in) → (N, in)
        if ctx.needs_input_grad[1]:
            grad_w = linear(g.t(), x.reshape(-1, x.shape[-1]).t())                    # (out, N)(N, in) → (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=0)                                                     # (out,)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """An nn.Linear (same parameters, same state_dict) whose fp32 CPU matmuls run through oneDNN,
    with or without gradients; anything else (CUDA, bf16, no operator) takes F.linear."""

    def forward(self, x):
        if available(x) and available(self.weight):
            return LinearFunction.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module, enable: bool = True) -> int:
    """Turn every plain nn.Linear in model into a oneDNN Linear in place (or back, enable=False).

    I change the modules' class rather than replacing them: the parameters stay the very same
    tensors, so an optimizer built before (or after) the switch keeps working, and the state_dict
    and saved checkpoints do not change. Returns how many modules were switched.
    """
    source, target = (nn.Linear, Linear) if enable else (Linear, nn.Linear)
    switched = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            switched += 1
    return switched
