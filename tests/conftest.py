"""Shared test fixtures."""
import os
from pathlib import Path

import pytest

from lib import cli

cli.setup_process()  # before torch loads: OpenMP reads its wait policy once

import torch  # noqa: E402

os.environ.setdefault("MESHSDF_QUIET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED_MESHES = REPO.parent / "shared" / "meshes"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, with the reason, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def shared_mesh():
    """Path of a real CC0 mesh in ../shared/meshes (bob or spot); skips when absent."""
    def get(name: str) -> Path:
        p = SHARED_MESHES / f"{name}.obj"
        if not p.is_file():
            pytest.skip(f"{p} not available")
        return p
    return get


@pytest.fixture(params=["blas", "onednn"])
def gemm(request, monkeypatch):
    """Each CPU GEMM library of the decoder kernels in turn (lib.models.kernels.gemm; oneDNN where
    this torch has it)."""
    import lib.models.kernels.gemm as gemm

    if request.param == "onednn" and not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN linear op")
    monkeypatch.setattr(gemm, "GEMM", request.param)
    return request.param
