"""fp32 Linear layers through oneDNN instead of the BLAS that PyTorch's CPU wheels link (MKL).

Why this file exists: PyTorch's CPU wheels send an fp32 `nn.Linear` to MKL's sgemm, yet the same
wheel holds a second matmul library, oneDNN, which on some CPUs (AMD ones among them) runs BERT's
matmul shapes at about twice the rate. The function computed is the same Linear; only the kernel
differs. bench.matmul_libraries measures both on the machine at hand; the numbers are in
docs/benchmarks.md, "Why oneDNN".

The kernel is `torch.ops.mkldnn._linear_pointwise(x, W, b, post_op, scalars, algorithm)`, the
fused linear that PyTorch's Inductor emits for CPUs: dense fp32 in, dense out, y = x Wᵀ + b,
optionally followed by a post-op (exact GELU) inside the same kernel, or with a residual added
(`.binary(x, residual, W, b, "add")`). It is a private operator, so `available()` checks that it
exists and agrees with F.linear before anything uses it, and everything falls back to F.linear
when it does not (other devices, other dtypes, other builds).

It has no autograd formula; `LinearFunction` supplies one, so training can use it too:

    y = x Wᵀ + b     →    ∂x = g W,   ∂W = gᵀ x,   ∂b = Σ_rows g

and each of those matmuls is again a `linear` (a (rows, out)·(out, in) product is linear(g, Wᵀ)).
The transposes cost little: the operator copies its input into row-major order if need be, and
reorders every dense weight into oneDNN's blocked layout on each call anyway, so a transposed
weight view rides on that reorder for free. `_op_works` checks that this build takes such views.

Training uses it through `onednn_linears(model)` (train/loop.py): inside the `with` block the
model's nn.Linears compute through oneDNN, afterwards they are plain nn.Linears again. That covers
every matmul of fine-tuning and of RetroMAE pre-training, whose MLM decoder is a plain nn.Linear
tied to the word-embedding table (retromae.py, MLMHead). `autograd_linear` is the same function
for a matmul that is no nn.Linear.
"""
import contextlib
import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..common import cpu_has_native_bf16


def cap_kernel_caches() -> None:
    """Cap oneDNN's and ideep's kernel caches at 64 entries, unless the user set a size already.

    oneDNN, and ideep (PyTorch's layer over it), each keep one compiled kernel per matmul shape, up
    to 1024 by default. Packed batches (fast/encoder.py) have a new row count almost every time, so
    over a long stream the two caches fill with kernels nobody asks for again, and the process
    grows by hundreds of MB (tests/fast/test_kernel_caches.py). 64 entries still cover every shape of a batch
    (4 per layer, the same in all layers).

    Both libraries read ONEDNN_PRIMITIVE_CACHE_CAPACITY and LRU_CACHE_CAPACITY once, when they first
    build a kernel (not when the library is loaded), so setting them just before minibge's first
    oneDNN operation is enough: _op_works() calls this before its test product, and every oneDNN
    call in minibge (the fast path, the training switch, the benchmarks) passes through available()
    first. Importing minibge changes no environment variable; oneDNN work the user's own code did
    before that has already fixed the sizes, and a value the user set wins (setdefault).
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    os.environ.setdefault("LRU_CACHE_CAPACITY", "64")


@functools.cache
def _op_works() -> bool:
    """The operator exists in this build and gives F.linear's numbers on a small problem."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    cap_kernel_caches()  # before the first oneDNN kernel is built, which is when both caches read their size
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=generator) for shape in ((5, 16), (8, 16), (8,)))
    w_view = w.t().contiguous().t()  # the same matrix, column-major: LinearFunction.backward passes such views
    try:
        with torch.no_grad():
            y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
            y_gelu = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
            y_view = torch.ops.mkldnn._linear_pointwise(x, w_view, b, "none", [], "")
            w_packed = torch.ops.mkldnn._reorder_linear_weight(w, 5)  # pack_weight's layout
            y_packed = torch.ops.mkldnn._linear_pointwise(x, w_packed, b, "none", [], "")
    except RuntimeError:
        return False
    reference = F.linear(x, w, b)
    return all(torch.allclose(y, expected, atol=1e-5) for y, expected in
               ((y, reference), (y_gelu, F.gelu(reference)), (y_view, reference), (y_packed, reference)))


def available(tensor: torch.Tensor, bf16: bool = False) -> bool:
    """oneDNN's linear can take this activation/weight: fp32 on the CPU, with a working operator;
    with bf16=True (the fast path's bf16 products) also bf16, where the CPU multiplies it in hardware."""
    if tensor.device.type != "cpu" or not _op_works():
        return False
    return tensor.dtype == torch.float32 or (bf16 and tensor.dtype == torch.bfloat16 and _bf16_op_works())


@functools.cache
def _bf16_op_works() -> bool:
    """The operator takes bf16 activations and (packed) bf16 weights on this CPU, with and without
    the GELU post-op, and agrees with F.linear to bf16's rounding (~2⁻⁸ relative)."""
    if not cpu_has_native_bf16():
        return False  # oneDNN would emulate bf16, slower than fp32
    generator = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=generator).bfloat16() for shape in ((5, 16), (8, 16), (8,)))
    try:
        with torch.no_grad():
            y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 5), b, "none", [], "")
            y_gelu = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
    except RuntimeError:
        return False
    reference = F.linear(x.float(), w.float(), b.float())
    return (y.dtype == torch.bfloat16 and torch.allclose(y.float(), reference, rtol=0.02, atol=0.05)
            and torch.allclose(y_gelu.float(), F.gelu(reference), rtol=0.02, atol=0.05))


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (out, in) weight reordered once into oneDNN's blocked layout, for linear(..., packed=).

    oneDNN multiplies by weights in its own blocked layout, and reorders a dense weight into it on
    every call: for a short-text batch of ~450 rows that reorder is a few percent of the matmul's
    time. A packed copy skips it (ONNX Runtime packs its weights once too). The result is an opaque
    tensor (layout torch._mkldnn) holding a second copy of the weight; it is only valid as long as
    the weight does not change, so FastEncoder re-packs whenever it rebuilds its matmuls.
    """
    # The second argument is the number of rows oneDNN may pick a layout for; the speed hardly
    # depends on it (64, 512 and 4096 ran alike on short and long texts), so one middle value.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 512)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
           residual: torch.Tensor | None = None, packed: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) → (..., out) = x Wᵀ + b, then exact GELU (gelu=True) or + residual, in one kernel.

    No autograd (see LinearFunction); callers check available() first. x and residual must be
    row-major, so I make them contiguous (a no-op when they are); the weight may be any strided
    view (oneDNN reorders it into its own layout on every call, see the module docstring), or
    `packed`, pack_weight(weight), is used instead and the reorder is skipped.
    """
    assert not (gelu and residual is not None), "one post-op at a time"
    if x.numel() == 0 or weight.numel() == 0:
        # oneDNN builds no primitive for an empty product (no rows, or in = 0 as in the weight
        # gradient of an empty batch); F.linear gives the zeros (+ bias) that are right there
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y if residual is None else y + residual
    x = x.contiguous()
    weight = weight if packed is None else packed
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
    @once_differentiable  # the backward's matmuls record no graph: a double backward must fail, not give 0
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        g = grad_output.reshape(-1, weight.shape[0])                                  # (N, out), any strides
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = linear(g, weight.t()).view(x.shape)                              # (N, out)(out, in) → (N, in)
        if ctx.needs_input_grad[1]:
            rows = x.reshape(-1, x.shape[-1])                                          # (N, in)
            # ∂W = gᵀ x. The first operand is copied to row-major, the second rides on oneDNN's weight
            # reorder, so I copy the smaller transpose (xᵀ, not gᵀ, for RetroMAE's (30,522 × 384) decoder).
            if weight.shape[0] <= weight.shape[1]:
                grad_w = linear(g.t(), rows.t())                                       # (out, N)(N, in) → (out, in)
            else:
                grad_w = linear(rows.t(), g.t()).t().contiguous()                      # ((in, N)(N, out))ᵀ
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=0)                                                     # (out,)
        return grad_x, grad_w, grad_b


def autograd_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, gradients included, through oneDNN when it can take these tensors (fp32, CPU), else
    F.linear itself (CUDA, bf16, float64, CPU autocast, no operator)."""
    # under autocast F.linear would run in bf16; the custom operator is not on autocast's lists and would not
    if available(x) and available(weight) and not torch.is_autocast_enabled(x.device.type):
        return LinearFunction.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """An nn.Linear (same parameters, same state_dict) whose fp32 CPU matmuls run through oneDNN,
    with or without gradients, by autograd_linear."""

    def forward(self, x):
        return autograd_linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module, enable: bool = True) -> int:
    """Turn every plain nn.Linear in model into a oneDNN Linear in place (or back, enable=False).

    I change the modules' class rather than replacing them: the parameters stay the very same
    tensors, so an optimizer built before (or after) the switch keeps working, and the state_dict
    and saved checkpoints do not change. Returns how many modules were switched.
    """
    source, target = (nn.Linear, Linear) if enable else (Linear, nn.Linear)
    return len(_retype([module for module in model.modules() if type(module) is source], target))


@contextlib.contextmanager
def onednn_linears(model: nn.Module):
    """`with onednn_linears(model) as n:` model's n plain nn.Linears compute through oneDNN inside the
    block, and are plain nn.Linears again after it, also when it raises. Modules that were oneDNN
    Linears before stay so. This is how train/loop.py uses it: the caller gets its model back as it gave
    it, because exact-type code only knows nn.Linear (quantize_dynamic's {nn.Linear} mapping, for one).
    """
    switched = _retype([module for module in model.modules() if type(module) is nn.Linear], Linear)
    try:
        yield len(switched)
    finally:
        _retype(switched, nn.Linear)


def _retype(modules: list[nn.Module], cls: type) -> list[nn.Module]:
    for module in modules:
        module.__class__ = cls
    return modules

