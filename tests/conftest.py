"""Test configuration: without a GPU, Triton kernels run interpreted on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set
here, before fastdiff (and fastdiff.kernels) are imported by the test modules.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
