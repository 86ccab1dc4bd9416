"""Gradients through frozen weights without saving (or copying) the weights.

A host may hold its weights as inference tensors (ComfyUI loads models under
``torch.inference_mode()``), which autograd refuses to save for backward; copying the model to get
normal tensors doubles its memory. Only the gradient with respect to the activations is ever needed
here (v*, A and B are trained, the weights never), and that gradient needs the weight only as a
read-only operand. So, inside ``frozen_weights()``, every ``linear``, ``conv2d``, ``group_norm`` and
``layer_norm`` whose input needs a gradient and whose weight does not runs as an autograd function
that keeps a plain reference to the weight (never saved, never copied) and saves only its input
(norms) or nothing (linear, conv). Other calls run unchanged. The context is a ``TorchFunctionMode``,
so it applies to every module implementation (plain torch, ComfyUI's ops) in the current thread, and
nowhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.weight = weight
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad @ ctx.weight.to(grad.dtype), None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups) -> Tensor:
        ctx.weight, ctx.input_shape, ctx.args = weight, x.shape, (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, ctx.weight.to(grad.dtype), grad, *ctx.args)
        return grad_input, None, None, None, None, None, None


class _AffineNorm(torch.autograd.Function):
    """``norm(x) * weight + bias`` for group and layer norm: the forward is the host's fused op; the
    backward recomputes the affine-free normalisation from the saved input and back-propagates
    ``grad * weight`` through it."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, normalize, affine) -> Tensor:
        ctx.save_for_backward(x)
        ctx.weight, ctx.normalize = weight, normalize
        return affine(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            normalized = ctx.normalize(x)
        weight = ctx.weight.to(grad.dtype)
        if ctx.normalize.channel_first:  # group norm: one weight per channel of (N, C, *)
            weight = weight.view(-1, *([1] * (normalized.ndim - 2)))
        (grad_x,) = torch.autograd.grad(normalized, x, grad * weight)
        return grad_x, None, None, None, None


class _GroupNorm:
    channel_first = True

    def __init__(self, num_groups: int, eps: float):
        self.num_groups, self.eps = num_groups, eps

    def __call__(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, None, None, self.eps)


class _LayerNorm:
    channel_first = False

    def __init__(self, normalized_shape, eps: float):
        self.normalized_shape, self.eps = normalized_shape, eps

    def __call__(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, None, None, self.eps)


def _is_frozen(tensor: Tensor | None) -> bool:
    """No gradient wanted: an inference tensor cannot get one, whatever its ``requires_grad`` says."""
    return tensor is None or tensor.is_inference() or not tensor.requires_grad


def _frozen_call(plain, frozen, x, weight, bias, *args):
    """``plain(x, weight, bias, *args)``, through the autograd function ``frozen`` when x needs a
    gradient and the weights are frozen; without a graph when neither needs one (an inference weight
    may still say ``requires_grad``, and autograd would try to save it)."""
    if not (torch.is_grad_enabled() and weight is not None and _is_frozen(weight) and _is_frozen(bias)):
        return plain(x, weight, bias, *args)
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    if isinstance(x, Tensor) and x.requires_grad:
        return frozen(x, weight, bias, *args)
    with torch.no_grad():
        return plain(x, weight, bias, *args)


def _linear(x, weight, bias=None):
    return _frozen_call(F.linear, _Linear.apply, x, weight, bias)


def _conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if isinstance(padding, str):  # "same"/"valid": conv2d_input needs numbers; no host model uses it
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _frozen_call(F.conv2d, _Conv2d.apply, x, weight, bias, stride, padding, dilation, groups)


def _group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    def plain(x, w, b):
        return F.group_norm(x, num_groups, w, b, eps)

    return _frozen_call(plain, lambda x, w, b: _AffineNorm.apply(x, w, b, _GroupNorm(num_groups, eps), plain),
                        x, weight, bias)


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    def plain(x, w, b):
        return F.layer_norm(x, normalized_shape, w, b, eps)

    return _frozen_call(plain, lambda x, w, b: _AffineNorm.apply(x, w, b, _LayerNorm(normalized_shape, eps), plain),
                        x, weight, bias)


_HANDLERS = {F.linear: _linear, F.conv2d: _conv2d, F.group_norm: _group_norm, F.layer_norm: _layer_norm}


class frozen_weights(TorchFunctionMode):
    """``with frozen_weights():`` autograd through frozen (e.g. inference-tensor) weights, saving no
    weight for backward (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        handler = _HANDLERS.get(func)
        return (handler or func)(*args, **(kwargs or {}))
