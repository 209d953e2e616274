"""The one GPU call is ready before its GPU: every stage of benchmarks/gpu_check.sh resolves its
command and files in --dry-run, and its stage limits fit the call's 8 minutes."""
import os
import re
import subprocess

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def test_dry_run_resolves_every_stage(tmp_path):
    r = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, OUT=str(tmp_path), PYTHON="python3"))
    assert r.returncode == 0, r.stdout + r.stderr
    for stage in ("build", "tests", "cuda-tests", "bench"):
        assert f"{stage}: resolved" in r.stdout, r.stdout
    assert "memcheck:" in r.stdout  # resolved where compute-sanitizer exists, else skipped


def test_stage_limits_fit_the_call_and_name_the_machine():
    text = open(SCRIPT).read()
    limits = [int(x) for x in re.findall(r"^stage \S+ (\d+) ", text, flags=re.M)]
    assert len(limits) >= 4 and sum(limits) <= 7.5 * 60
    for fact in ("H200", "Python 3.12", "torch 2.11", "Triton 3.6", "nvcc 13.0"):
        assert fact in text
