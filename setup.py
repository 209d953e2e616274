"""Build of the compiled extension ``dasm._C`` (metadata lives in pyproject.toml).

What gets built, decided here (and printed):

* ``DASM_NO_EXT=1``: nothing; dasm runs on its reference backend and says so once.
* otherwise the C++ (CPU) part always, plus the CUDA part where a CUDA toolkit and a CUDA build
  of torch are present (``DASM_FORCE_CUDA=1`` forces it, ``DASM_NO_CUDA=1`` leaves it out).
* CUDA architectures: ``TORCH_CUDA_ARCH_LIST`` when set; else those of the visible GPUs; else,
  with no GPU visible (a build machine), :data:`DEFAULT_ARCHS`.
* CUDA toolkit: ``CUDA_HOME`` when set; else the toolkit that holds a CUDA runtime to link
  against, found from ``nvcc`` on the PATH (following wrapper scripts) or ``/usr/local/cuda``.

Install with ``pip install --no-build-isolation .`` so that the build sees the installed torch.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from setuptools import setup

DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100 and H100 code, PTX that newer GPUs compile at load time


def say(msg: str) -> None:
    print(f"dasm build: {msg}", flush=True)


def _has_runtime(home: Path) -> bool:
    return any((home / d / "libcudart.so").exists() for d in ("lib64", "lib"))


def find_cuda_home() -> str | None:
    """A CUDA toolkit with a runtime library to link against, or None."""
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(os.path.realpath(nvcc))
        candidates.append(real.parent.parent)
        try:  # a wrapper script such as "exec /usr/local/cuda-13.0/bin/nvcc"
            text = real.read_text(errors="ignore")[:4096] if real.stat().st_size < 4096 else ""
            candidates += [Path(m).parent.parent for m in re.findall(r"(/\S+/bin/nvcc)\b", text)]
        except OSError:
            pass
    candidates.append(Path("/usr/local/cuda"))
    return next((str(c) for c in candidates if (c / "bin" / "nvcc").exists() and _has_runtime(c)),
                None)


def extensions():
    if os.environ.get("DASM_NO_EXT") == "1":
        say("DASM_NO_EXT=1: building no extension (reference backend only)")
        return [], {}
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        home = find_cuda_home()
        if home:
            os.environ["CUDA_HOME"] = home
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("DASM_FORCE_CUDA") == "1"
    with_cuda = force or (os.environ.get("DASM_NO_CUDA") != "1" and CUDA_HOME is not None
                          and torch.version.cuda is not None)
    sources = ["csrc/ext.cpp"]
    args = {"cxx": ["-O3", "-fopenmp-simd"]}
    if not with_cuda:
        why = "DASM_NO_CUDA=1" if os.environ.get("DASM_NO_CUDA") == "1" else \
            "no CUDA toolkit" if CUDA_HOME is None else "torch is built without CUDA"
        say(f"C++ part only ({why})")
        return [CppExtension("dasm._C", sources, extra_compile_args=args)], \
            {"build_ext": BuildExtension}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            say("CUDA architectures: those of the visible GPUs")
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
            say(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: CUDA code for {DEFAULT_ARCHS}")
    else:
        say(f"CUDA architectures: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    say(f"C++ and CUDA parts (CUDA_HOME={CUDA_HOME})")
    sources.append("csrc/accumulate_cuda.cu")
    args["nvcc"] = ["-O3"]
    ext = CUDAExtension("dasm._C", sources, extra_compile_args=args,
                        define_macros=[("DASM_WITH_CUDA", None)])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
