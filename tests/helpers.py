"""Helpers shared by tests (importable because pytest puts tests/ on the path)."""

import torch


def state_checksums(*modules):
    """Exact copies of every parameter and buffer, to prove nothing was written."""
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def assert_unchanged(before, modules):
    for snapshot, module in zip(before, modules, strict=True):
        for key, value in module.state_dict().items():
            assert torch.equal(snapshot[key], value), f"{type(module).__name__}.{key} changed"
