"""Build facts and the import-time check that the build matches the installed torch."""
import os
import shutil

import pytest
import torch

import gradstats
from gradstats import _build_config, _loader


def test_build_info_reports_versions_and_cuda():
    info = gradstats.build_info()
    assert info["version"] == gradstats.__version__
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda_compiled"], bool)
    if info["cuda_compiled"]:
        assert torch.version.cuda is not None and info["cuda_archs"]
    if torch.version.cuda is None:
        assert not info["cuda_compiled"]


@pytest.mark.skipif(os.environ.get("GRADSTATS_FORCE_CUDA") != "1" or shutil.which("nvcc") is None
                    or torch.version.cuda is None,
                    reason="needs GRADSTATS_FORCE_CUDA=1, nvcc and a CUDA build of torch")
def test_cuda_kernels_are_built_where_nvcc_is_present():
    assert gradstats.build_info()["cuda_compiled"]


def test_mismatched_torch_is_refused_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(_build_config, "TORCH_VERSION", "1.0.0+other")
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0\+other but torch "
                                          + torch.__version__.replace("+", r"\+")):
        _loader.load_library()
