"""The README's install command builds a wheel that holds the compiled extension and the Triton
kernels, and that wheel imports outside the source tree (slow: it compiles the extension)."""
import glob
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_wheel_from_the_readme_command(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH", "DASM_NO_EXT")}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
                        "-w", str(tmp_path / "wheels"), ROOT],
                       capture_output=True, text=True, env=env, timeout=2400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "dasm build:" in r.stdout + r.stderr  # the build says what it chose
    (wheel,) = glob.glob(str(tmp_path / "wheels" / "dasm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("dasm/_C") and n.endswith(".so") for n in names), names
    for k in ("decode_augment", "grad_distance", "sample_scores"):
        assert f"dasm/kernels/{k}.py" in names
    # install it beside (not over) the environment's torch, and import it from elsewhere
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                        str(site), wheel], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    probe = ("import dasm, dasm._C, dasm.kernels.grad_distance as k, sys; "
             "print(dasm.__file__); print(dasm._C.__file__); print(dasm.__version__)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       cwd=tmp_path, env=dict(env, PYTHONPATH=str(site), TRITON_INTERPRET="1"),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split()
    assert lines[0].startswith(str(site)) and lines[1].startswith(str(site)), lines
