"""Build convkernels and its compiled extension convkernels._C.

The CPU part of _C is always built. The CUDA part is built when
CONVKERNELS_CUDA=1, or (default CONVKERNELS_CUDA=auto) when nvcc and a CUDA
build of torch are both present. TORCH_CUDA_ARCH_LIST defaults to sm_80 and
sm_90 code plus sm_90 PTX, which the driver compiles for newer GPUs (Blackwell);
the list is recorded in the extension, so that the ``cuda`` backend is only used
on GPUs it has code for. MAX_JOBS is honoured by torch's ninja build.
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _fail(msg):
    sys.stderr.write(f"\nconvkernels build error: {msg}\n\n")
    sys.exit(1)


try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    _fail(
        "PyTorch must be installed before building convkernels "
        "(pip install torch, then pip install --no-build-isolation .)"
    )


def _cuda_wanted():
    mode = os.environ.get("CONVKERNELS_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        _fail(f"CONVKERNELS_CUDA must be auto, 0 or 1, got {mode!r}")
    have_nvcc = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    have_cuda_torch = torch.version.cuda is not None
    if mode == "0":
        return False
    if mode == "1" and not (have_nvcc and have_cuda_torch):
        _fail(
            "CONVKERNELS_CUDA=1 but "
            + ("nvcc was not found (set CUDA_HOME)" if not have_nvcc else "torch is a CPU-only build")
        )
    if mode == "auto" and not (have_nvcc and have_cuda_torch):
        print("convkernels: building the CPU part only (no nvcc or CPU-only torch)")
    return have_nvcc and have_cuda_torch


def _nvidia_wheel_includes():
    """CUDA headers shipped in the nvidia-* wheels (torch's CUDA wheels depend on them).

    A bare toolkit may lack e.g. cusparse.h, which torch's CUDA headers include.
    """
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _cpu_flags():
    flags = ["-O3"]  # torch adds the C++ standard its headers need
    # at::vec picks its SIMD implementation from CPU_CAPABILITY; x86-64 builds
    # use AVX2+FMA (every x86 server CPU since 2013). CONVKERNELS_CPU_CAPABILITY
    # =DEFAULT builds portable scalar code instead.
    cap = os.environ.get("CONVKERNELS_CPU_CAPABILITY")
    if cap is None:
        cap = "AVX2" if platform.machine() in ("x86_64", "AMD64") else "DEFAULT"
    if cap == "AVX2":
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    elif cap == "DEFAULT":
        flags += ["-DCPU_CAPABILITY=DEFAULT"]
    else:
        _fail(f"CONVKERNELS_CPU_CAPABILITY must be AVX2 or DEFAULT, got {cap!r}")
    return flags


def _openmp_flags():
    """-fopenmp where torch's intra-op backend is OpenMP. at::parallel_for is an
    inline template: compiled without OpenMP, every loop of our kernels runs on
    one thread whatever torch.get_num_threads() says. The library is torch's
    own libgomp (same soname, already loaded by `import torch`)."""
    if sys.platform == "darwin":  # Apple clang has no -fopenmp
        return []
    return ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []


GENERATED = os.path.join(ROOT, "build", "generated")


def _write_build_header(cuda_archs):
    """build/generated/build_info.h: what the extension reports of its build
    (a header, not a -D flag: the arch list's ';' would reach a shell)."""
    text = f'#pragma once\n#define CONVKERNELS_CUDA_ARCHS "{cuda_archs}"\n'
    path = os.path.join(GENERATED, "build_info.h")
    os.makedirs(GENERATED, exist_ok=True)
    if not os.path.exists(path) or open(path).read() != text:  # unchanged: no rebuild
        with open(path, "w") as f:
            f.write(text)


def _extension():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        _fail("no C++ compiler found (install g++)")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    extra = {"cxx": _cpu_flags() + _openmp_flags()}
    link = _openmp_flags()
    include_dirs = [os.path.join(ROOT, "csrc"), GENERATED]
    cuda = _cuda_wanted()
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS) if cuda else ""
    _write_build_header(archs)
    if cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += _nvidia_wheel_includes()
        # No --use_fast_math: it flushes denormals to zero and approximates
        # division, exp and rsqrt, so results would differ from the CPU kernels
        # and the reference; the kernels are memory-bound, where it gains little.
        extra["nvcc"] = ["-O3", "-lineinfo"]
        extra["cxx"].append("-DCONVKERNELS_WITH_CUDA")
        return cpp_extension.CUDAExtension(
            "convkernels._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
            extra_link_args=link
        )
    return cpp_extension.CppExtension(
        "convkernels._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
        extra_link_args=link
    )


setup(
    name="convkernels",
    version="0.1.0",
    description="Fused CNN kernels (conv+BN+act, BN+act, dense blocks) for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["convkernels", "convkernels.ops", "convkernels.nn", "convkernels.fuse",
              "convkernels.models", "convkernels.triton_kernels"],
    # Wheels take the Triton kernels from the top-level triton_kernels/; the
    # symlink convkernels/triton_kernels serves in-tree and editable imports.
    package_dir={"convkernels.triton_kernels": "triton_kernels"},
    install_requires=["torch>=2.6"],
    extras_require={"triton": ["triton"], "test": ["pytest", "torchvision"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["convkernels=convkernels.cli:main"]},
)
