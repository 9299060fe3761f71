"""Builds blossom_ops._C with torch.utils.cpp_extension.

CUDA is built only when a CUDA toolkit is found (CUDAExtension); otherwise the CPU-only
build (CppExtension) is first-class. Environment switches:
  BLOSSOM_OPS_CUDA=1 / 0        force the CUDA build on / off
  TORCH_CUDA_ARCH_LIST          CUDA architectures (default "8.0;9.0")
  BLOSSOM_OPS_CPU_FLAGS         extra CPU compile flags; default "-mavx2 -mfma" when the
                                build machine has AVX2 and FMA, nothing otherwise
                                (set it to "" when building for older CPUs)
  BLOSSOM_OPS_DEBUG=1           -O0 -g instead of -O3
  BLOSSOM_OPS_ASAN=1            host code built with AddressSanitizer (run python with
                                LD_PRELOAD=$(g++ -print-file-name=libasan.so) and, with
                                CUDA, ASAN_OPTIONS=protect_shadow_gap=0)
  MAX_JOBS                      parallel compile jobs (ninja)
Install with `pip install --no-build-isolation -e .` so the torch already installed is
used to build (build isolation would download a CUDA build of torch).
"""
import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("BLOSSOM_OPS_CUDA")
    if forced is not None:
        return forced == "1"
    return CUDA_HOME is not None


def default_cpu_flags() -> list:
    if "BLOSSOM_OPS_CPU_FLAGS" in os.environ:
        return os.environ["BLOSSOM_OPS_CPU_FLAGS"].split()
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if (" avx2" in info and " fma" in info) else []


def extension():
    debug = os.environ.get("BLOSSOM_OPS_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    asan = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"] \
        if os.environ.get("BLOSSOM_OPS_ASAN") == "1" else []
    sources = sorted(
        glob.glob("csrc/*.cpp") + glob.glob("csrc/common/*.cpp") + glob.glob("csrc/ops/*.cpp")
        + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autograd/*.cpp"))
    # torch.utils.cpp_extension picks the C++ standard torch itself needs (C++20 for 2.13).
    cxx = opt + asan + ["-fopenmp", "-DPy_LIMITED_API=0x03090000"] + default_cpu_flags()
    kwargs = dict(
        name="blossom_ops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"] + asan[:1],
        py_limited_api=True,
    )
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo",
                      "-DBLOSSOM_WITH_CUDA"] + [f"-Xcompiler={f}" for f in asan]
        kwargs["extra_compile_args"] = {"cxx": cxx + ["-DBLOSSOM_WITH_CUDA"], "nvcc": nvcc}
        return CUDAExtension(**kwargs)
    kwargs["extra_compile_args"] = {"cxx": cxx}
    return CppExtension(**kwargs)


setup(
    # blossom_ops/integrations is a link to the top-level integrations/ folder, so the
    # adapters import as blossom_ops.integrations from a checkout and once installed.
    packages=find_packages(include=["blossom_ops", "blossom_ops.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
