import pytest
import torch

torch.set_num_threads(2)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def devices():
    """CPU always; CUDA where a GPU is present (marked so it can be selected with -m cuda)."""
    out = ["cpu"]
    out.append(pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda]))
    return out
