"""Build of fastdiff's C++/CUDA extension (the torch extension convention).

Extensions:
  fastdiff._C               operator schemas (csrc/fastdiff_ops.cpp), the C++ autograd of the
                            per-layer ops (csrc/autograd) + CUDA kernels (csrc/cuda)
  fastdiff._C_cpu_<cap>     the CPU kernels (csrc/cpu) compiled once per CPU capability
                            (default, avx2, avx512); fastdiff loads the best one the CPU runs.

Environment:
  FASTDIFF_SKIP_CUDA=1      do not build the CUDA kernels
  FASTDIFF_FORCE_CUDA=1     build them even when torch/nvcc are not detected
  TORCH_CUDA_ARCH_LIST      CUDA archs, default "8.0;9.0"
  FASTDIFF_CPU_CAPS         CPU capabilities to build, default "default;avx2;avx512" on x86-64
  MAX_JOBS                  parallel compile jobs (ninja)

Install: pip install --no-build-isolation -e .   (after torch)
"""
import glob
import os
import platform
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    # The nvcc on PATH can be a wrapper script, which makes torch guess the home
    # wrong; the standard location wins when CUDA_HOME is unset.
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    return os.environ.get("CUDA_HOME")


_find_cuda_home()
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402  (after CUDA_HOME is set: cpp_extension reads it at import)
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

# Per-capability flags; the defines select at::vec::Vectorized's implementation.
CPU_CAPS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
}
# -ffp-contract=off: a vector body and its tail round identically (no compiler-chosen FMAs),
# so every layout of the same values gives bitwise the same result.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-maybe-uninitialized"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def _want_cuda():
    if os.environ.get("FASTDIFF_SKIP_CUDA") == "1":
        return False, "FASTDIFF_SKIP_CUDA=1"
    if os.environ.get("FASTDIFF_FORCE_CUDA") == "1":
        return True, "FASTDIFF_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}) and nvcc in {CUDA_HOME}"


def _nvidia_pip_includes():
    # CUDA headers that torch's own headers include (cusparse.h, cublas_v2.h...)
    # ship in the nvidia-* wheels: nvidia/cu13/include for CUDA 13,
    # nvidia/<lib>/include for CUDA 12.
    dirs = []
    for base in sys.path:
        nv = os.path.join(base, "nvidia")
        if os.path.isdir(nv):
            dirs += sorted(glob.glob(os.path.join(nv, "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(nv, "*", "include")))
    seen, out = set(), []
    for d in dirs:
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def _cpu_caps():
    env = os.environ.get("FASTDIFF_CPU_CAPS")
    if env:
        caps = [c.strip() for c in env.replace(",", ";").split(";") if c.strip()]
    elif platform.machine() in ("x86_64", "AMD64"):
        caps = ["default", "avx2", "avx512"]
    else:
        caps = ["default"]
    unknown = [c for c in caps if c not in CPU_CAPS]
    if unknown:
        raise SystemExit(f"FASTDIFF_CPU_CAPS: unknown capability {unknown}; known: {list(CPU_CAPS)}")
    if "default" not in caps:
        caps.insert(0, "default")
    return caps


def _cpu_extension(cap):
    # The same kernel sources are compiled once per capability; thin wrappers
    # in their own folder keep each capability's objects apart.
    wrap_dir = os.path.join("build", "cpu_sources", cap)
    os.makedirs(os.path.join(ROOT, wrap_dir), exist_ok=True)
    sources = []
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))):
        wrapper = os.path.join(wrap_dir, os.path.basename(src))
        text = f'#include "{src}"\n'
        path = os.path.join(ROOT, wrapper)
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        sources.append(wrapper)
    name = f"_C_cpu_{cap}"
    return CppExtension(
        f"fastdiff.{name}",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "cpu")],
        extra_compile_args=CXX_FLAGS + CPU_CAPS[cap] + [f"-DFASTDIFF_CPU_MODULE={name}"],
        extra_link_args=["-fopenmp"],
    )


# Autograd kernels written in C++ (dispatch key Autograd: one build serves CPU and CUDA).
AUTOGRAD_SOURCES = sorted(glob.glob("csrc/autograd/*.cpp"))


def _extensions():
    use_cuda, why = _want_cuda()
    caps = _cpu_caps()
    include = [os.path.join(ROOT, "csrc", "include")]
    if use_cuda:
        sources = ["csrc/fastdiff_ops.cpp"] + AUTOGRAD_SOURCES + sorted(glob.glob("csrc/cuda/*.cu"))
        main = CUDAExtension(
            "fastdiff._C",
            sources,
            include_dirs=include + _nvidia_pip_includes(),
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
    else:
        main = CppExtension("fastdiff._C", ["csrc/fastdiff_ops.cpp"] + AUTOGRAD_SOURCES, include_dirs=include,
                            extra_compile_args=CXX_FLAGS)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"] if use_cuda else ""
    config = (
        "# Written by setup.py at build time; read by fastdiff.info().\n"
        f"CUDA_BUILT = {use_cuda!r}\n"
        f"CUDA_REASON = {why!r}\n"
        f"CUDA_ARCHS = {archs!r}\n"
        f"CPU_CAPS = {caps!r}\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
    )
    with open(os.path.join(ROOT, "fastdiff", "_build_config.py"), "w") as f:
        f.write(config)
    print(f"fastdiff: CUDA kernels {'built' if use_cuda else 'skipped'} ({why}); "
          f"CPU capabilities {caps}")
    return [main] + [_cpu_extension(c) for c in caps]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
