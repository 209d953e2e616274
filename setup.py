"""Build of the compiled extension ``dasm._C`` (metadata lives in pyproject.toml).

The C++ (CPU) part is always built; the CUDA part where a CUDA toolkit and a CUDA build of
torch are present. ``DASM_FORCE_CUDA=1`` forces the CUDA part, ``DASM_NO_EXT=1`` skips the
extension altogether (dasm then runs on its reference backend and says so once).
Install with ``pip install --no-build-isolation .`` so that the build sees the installed torch.
"""
import os

from setuptools import setup


def extensions():
    if os.environ.get("DASM_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("DASM_FORCE_CUDA") == "1"
    with_cuda = force or (CUDA_HOME is not None and torch.version.cuda is not None)
    sources = ["csrc/ext.cpp"]
    args = {"cxx": ["-O3", "-fopenmp-simd"]}
    macros = []
    if with_cuda:
        sources.append("csrc/accumulate_cuda.cu")
        args["nvcc"] = ["-O3"]
        macros.append(("DASM_WITH_CUDA", None))
        ext = CUDAExtension("dasm._C", sources, extra_compile_args=args, define_macros=macros)
    else:
        ext = CppExtension("dasm._C", sources, extra_compile_args=args)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
