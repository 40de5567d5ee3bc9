import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: runs in several spawned gloo processes")
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped on CPU)")
    config.addinivalue_line("markers", "soak: long reliability runs (kill / resume); deselect with -m 'not soak'")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; the CPU logic is covered by tests/unit and tests/distributed")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
