"""Gradients through inference-tensor weights without copying them (``datencoder_core.frozen``)."""

import pytest
import torch
from torch import nn

from datencoder_core.frozen import frozen_weights


def _model():
    """Every op kind the UNet and the text model use with weights: conv (strided, grouped), group
    norm, layer norm, linear."""
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.Flatten(2), nn.LayerNorm(16),
                         nn.Linear(16, 5))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    normal = _model().requires_grad_(False)
    with torch.inference_mode():  # as ComfyUI's loaders create weights
        inference = _model()
        inference.load_state_dict(normal.state_dict())
    return normal, inference


def _input_gradient(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    return out, grad


def test_gradients_equal_those_of_normal_weights(models):
    normal, inference = models
    assert all(p.is_inference() for p in inference.parameters())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected_out, expected_grad = _input_gradient(normal, x)
    with frozen_weights():
        out, grad = _input_gradient(inference, x)
    assert torch.equal(out, expected_out)
    assert torch.allclose(grad, expected_grad, atol=1e-6), (grad - expected_grad).abs().max()
    assert grad.abs().sum() > 0


def test_without_it_autograd_refuses_inference_weights(models):
    """The failure the context exists for (so the test above shows it does something)."""
    _, inference = models
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        _input_gradient(inference, torch.randn(1, 4, 8, 8))


def test_no_weight_is_saved_for_backward(models):
    """Only activations are kept for backward: no saved tensor shares a weight's storage or shape."""
    normal, _ = models
    weights = {p.data_ptr() for p in normal.parameters()}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), frozen_weights():
        normal(x).sum().backward()
    assert saved and not any(t.data_ptr() in weights for t in saved)


def test_trainable_weights_are_left_to_autograd():
    torch.manual_seed(0)
    model = _model()
    with frozen_weights():
        model(torch.randn(1, 4, 8, 8)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_inference_weights_that_say_requires_grad_on_inputs_without_grad(models):
    """An inference weight may carry requires_grad=True (an nn.Parameter made in inference mode); on an
    input that needs no gradient the layer then runs without a graph, instead of autograd trying to
    save the weight."""
    _, inference = models
    assert all(p.requires_grad for p in inference.parameters())
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        inference(x)
    with frozen_weights():
        out = inference(x)
    assert not out.requires_grad and torch.equal(out, models[0](x))
