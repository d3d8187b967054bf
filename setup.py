"""Build gradstats: CPU kernels always; CUDA kernels when torch has CUDA and nvcc is found.

Switches (environment):
  GRADSTATS_FORCE_CUDA=1   fail if the CUDA kernels cannot be built
  GRADSTATS_SKIP_CUDA=1    build the CPU kernels only (quick local loops)
  TORCH_CUDA_ARCH_LIST     GPU architectures; defaults to 7.5 and newer when no GPU is visible
  CUDA_HOME                toolkit root; otherwise found from the nvcc on PATH
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "gradstats"))
from _version import __version__  # noqa: E402

sys.path.pop(0)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _find_cuda_home():
    """The toolkit root, from CUDA_HOME or the nvcc on PATH (which may be a wrapper script).

    torch.utils.cpp_extension fixes CUDA_HOME when it is imported, so this runs first.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.realpath(root)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:  # nvcc -v prints its own variables, TOP among them, for a dry run
        out = subprocess.run([nvcc, "-v", "--dryrun", "-E", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
        if m and os.path.exists(os.path.join(m.group(1).strip(), "bin", "nvcc")):
            return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


_cuda_home = None if _flag("GRADSTATS_SKIP_CUDA") else _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

FORCE_CUDA = _flag("GRADSTATS_FORCE_CUDA")
SKIP_CUDA = _flag("GRADSTATS_SKIP_CUDA")
if FORCE_CUDA and SKIP_CUDA:
    sys.exit("gradstats: GRADSTATS_FORCE_CUDA and GRADSTATS_SKIP_CUDA are both set")

why_no_cuda = None
if SKIP_CUDA:
    why_no_cuda = "GRADSTATS_SKIP_CUDA is set"
elif torch.version.cuda is None:
    why_no_cuda = f"torch {torch.__version__} has no CUDA"
elif _cuda_home is None:
    why_no_cuda = "no CUDA toolkit found (no nvcc on PATH and no CUDA_HOME)"
WITH_CUDA = why_no_cuda is None
if FORCE_CUDA and not WITH_CUDA:
    sys.exit(f"gradstats: GRADSTATS_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why_no_cuda}")
if not WITH_CUDA:
    print(f"gradstats: building CPU kernels only ({why_no_cuda})")

if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    major = int(torch.version.cuda.split(".")[0])
    archs = "7.5;8.0;8.6;8.9;9.0;10.0;12.0" if major >= 13 else "7.0;7.5;8.0;8.6;8.9;9.0"
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(f"gradstats: no GPU visible, TORCH_CUDA_ARCH_LIST defaults to {archs}")
cuda_archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected") if WITH_CUDA else ""

# The torch this build links against, checked by gradstats/__init__.py before the library loads.
with open(os.path.join(HERE, "gradstats", "_build_config.py"), "w") as f:
    f.write("# Written by setup.py at build time.\n")
    f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
    f.write(f"WITH_CUDA = {WITH_CUDA!r}\n")

sources = ["csrc/module.cpp", "csrc/ops.cpp", "csrc/accumulate.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
macros = [
    ("GRADSTATS_VERSION", f'"{__version__}"'),
    ("GRADSTATS_TORCH_VERSION", f'"{torch.__version__}"'),
]
cxx_flags = ["-O3"]
include_dirs = [os.path.join(HERE, "csrc")]
if WITH_CUDA:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    macros += [
        ("GRADSTATS_WITH_CUDA", None),
        ("GRADSTATS_CUDA_ARCHS", f'"{cuda_archs}"'),
        ("GRADSTATS_CUDA_VERSION", f'"{torch.version.cuda}"'),
    ]
    # The CUDA wheels ship the cuBLAS/cuSPARSE headers some ATen CUDA headers include.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
    Ext = cpp_extension.CUDAExtension
    extra = {"cxx": cxx_flags, "nvcc": ["-O3"]}
else:
    Ext = cpp_extension.CppExtension
    extra = {"cxx": cxx_flags}

setup(
    version=__version__,
    ext_modules=[
        Ext(
            name="gradstats._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args=extra,
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
