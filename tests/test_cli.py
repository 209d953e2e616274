"""The command line end to end, and bad input: exit status 2, one clear line, nothing touched."""
import hashlib
import os

import pytest
import torch

from dasm.cli import main

from conftest import SMOKE


def snapshot(folder):
    return {p: hashlib.sha256(open(os.path.join(folder, p), "rb").read()).hexdigest()
            for p in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, p))}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "smoke")
    assert main(["distill", "--config", SMOKE, "--out", out]) == 0
    return out


def test_distill_and_evaluate_end_to_end(smoke_run, capsys):
    files = set(os.listdir(smoke_run))
    assert {"config.yaml", "synthetic.safetensors", "metrics.jsonl", "grid_seg1.png",
            "checkpoints"} <= files
    assert main(["evaluate", smoke_run]) == 0
    out = capsys.readouterr().out
    assert "last epoch" in out and "%" in out
    assert os.path.exists(os.path.join(smoke_run, "eval.json"))
    assert main(["info", smoke_run]) == 0


@pytest.mark.numerics
def test_same_seed_bit_identical(smoke_run, tmp_path):
    from dasm import SyntheticSet

    again = str(tmp_path / "again")
    assert main(["distill", "--config", SMOKE, "--out", again]) == 0
    a = SyntheticSet.load(os.path.join(smoke_run, "synthetic.safetensors"))
    b = SyntheticSet.load(os.path.join(again, "synthetic.safetensors"))
    assert torch.equal(a.images, b.images)
    other = str(tmp_path / "other")
    assert main(["distill", "--config", SMOKE, "--out", other, "--seed", "1"]) == 0
    assert not torch.equal(a.images, SyntheticSet.load(os.path.join(other, "synthetic.safetensors")).images)


def test_export_both_formats(smoke_run, tmp_path):
    assert main(["export", smoke_run, "--format", "ddranking", "--to", str(tmp_path / "dd")]) == 0
    x = torch.load(tmp_path / "dd" / "images.pt")
    y = torch.load(tmp_path / "dd" / "labels.pt")
    assert x.shape == (80, 1, 28, 28) and y.tolist() == sorted(y.tolist())
    assert main(["export", smoke_run, "--format", "imagefolder", "--to", str(tmp_path / "if")]) == 0
    assert len(os.listdir(tmp_path / "if" / "train")) == 10
    assert len(os.listdir(tmp_path / "if" / "train" / "001-Trouser")) == 8
    # a second export to the same place is refused
    assert main(["export", smoke_run, "--format", "ddranking", "--to", str(tmp_path / "dd")]) == 2


@pytest.mark.parametrize("argv, message", [
    (["distill", "--ipc", "0"], "synthetic.ipc' must be > 0"),
    (["distill", "--ipc", "-3"], "synthetic.ipc' must be > 0"),
    (["distill", "--dataset", "imagenet-42"], "unknown dataset 'imagenet-42'"),
    (["distill", "--set", "model.name=transformer"], "unknown model 'transformer'"),
    (["distill", "--dataset", "cifar10", "--data-root", "/nonexistent/dasm"], "does not exist"),
    (["distill", "--set", "match.speed=11"], "unknown config key 'match.speed'"),
    (["distill", "--set", "dasm.segments=3"], "do not divide"),
    (["distill", "--set", "match.metric=hamming"], "match.metric"),
    (["distill", "--set", "backend=grad_distance=warp"], "config key 'backend': unknown backend"),
    (["distill", "--set", "backend=conv=triton"], "config key 'backend': unknown op 'conv'"),
    (["distill", "--set", "synthetic.factor=[2,0]"], "synthetic.factor"),
    (["distill", "--set", "dasm.pool=lack", "--set", "dasm.easy_drop=0.3"], "'dasm.pool' is lack"),
    (["distill", "--set", "dasm.pool=rank", "--set", "dasm.lack_fill=margin"],
     "'dasm.pool' is rank"),
])
def test_bad_input_exit_2_and_outputs_untouched(smoke_run, capsys, argv, message):
    before = snapshot(smoke_run)
    assert main(argv[:1] + ["--config", SMOKE, "--out", smoke_run] + argv[1:]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert snapshot(smoke_run) == before


def test_existing_run_is_not_overwritten(smoke_run, capsys):
    before = snapshot(smoke_run)
    assert main(["distill", "--config", SMOKE, "--out", smoke_run]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(smoke_run) == before


def test_corrupt_synthetic_set_exit_2(tmp_path, smoke_run, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(smoke_run, bad)
    (bad / "synthetic.safetensors").write_bytes(b"\x00" * 64)
    before = snapshot(bad)
    assert main(["evaluate", str(bad)]) == 2
    assert "corrupt synthetic set" in capsys.readouterr().err
    assert snapshot(bad) == before


def test_console_script_exit_code(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "dasm", "distill", "--ipc", "0", "--out",
                        str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "synthetic.ipc" in r.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("spec", ["compile", "grad_distance=compile", "reference",
                                  "grad_distance=triton,decode_augment=reference"])
def test_backend_specs_the_readme_offers_load(spec):
    from conftest import smoke_config

    assert smoke_config(f"backend={spec}").backend == spec


def test_the_cli_offers_every_baseline():
    from dasm import baselines, cli
    assert cli.BASELINES == baselines.METHODS
