"""Issue 26, as a hostile user tried it: nothing lost after the work is done, no folder locked
by a failed start, what was asked done or refused, one line for every bad input. Each test
fails on the code before that issue."""
import ctypes
import os
import shutil
import stat
import subprocess
import sys

import pytest

from dasm.cli import main

from conftest import ROOT, SMOKE
from test_cli import snapshot
from test_trust import one_error_line

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3


def _held_to_mode_bits():
    """preexec_fn: as root, drop the capabilities that let root write past the mode bits (the
    interpreter lives below /root, so switching to another uid could not even start it)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def dasm_child(argv, timeout=90, preexec_fn=None):
    """``python -m dasm argv`` in a child process (its whole stderr is seen, warnings too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "dasm", *map(str, argv)], cwd=ROOT, env=env,
                          preexec_fn=preexec_fn, capture_output=True, text=True, timeout=timeout)


def dasm_without_write_rights(argv, timeout=90):
    """:func:`dasm_child` that cannot write where the mode bits say no, even when the tests
    run as root. Returns the CompletedProcess."""
    return dasm_child(argv, timeout, _held_to_mode_bits)


def read_only(folder):
    """Take write permission from ``folder`` and everything below it."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o444)
        os.chmod(root, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP
                 | stat.S_IROTH | stat.S_IXOTH)


def one_line(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("dasm: error:"), proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lost") / "run"
    assert main(["distill", "--config", SMOKE, "--out", str(out)]) == 0
    return out


def copy_of(run, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


# ------------------------------------------------- 1. work lost after it is done
def test_evaluate_read_only_run_is_refused_before_training(smoke_run, tmp_path):
    run = copy_of(smoke_run, tmp_path)
    read_only(run)
    before = snapshot(run)
    # 100000 epochs would take hours: only a refusal before training returns in time
    proc = dasm_without_write_rights(["evaluate", run, "--epochs", "100000", "--repeats", "1"])
    one_line(proc, f"cannot write {run / 'eval.json'}", "nothing was done")
    assert proc.stdout == "" and snapshot(run) == before


def test_score_model_from_read_only_run_is_refused_before_training(smoke_run, tmp_path):
    run = copy_of(smoke_run, tmp_path)
    read_only(run)
    proc = dasm_without_write_rights(["score", "--config", SMOKE, "--model-from", run,
                                      "--out", tmp_path / "s.safetensors", "--epochs", "100000"])
    one_line(proc, f"cannot write {run / 'model.pt'}")
    assert not (tmp_path / "s.safetensors").exists()


def test_distill_with_read_only_checkpoints_is_refused_before_config(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    read_only(out / "checkpoints")
    proc = dasm_without_write_rights(["distill", "--config", SMOKE, "--out", out])
    one_line(proc, str(out / "checkpoints" / "segment_001.pt"))
    assert not (out / "config.yaml").exists()  # the folder is not claimed


def test_export_names_the_file_it_cannot_write(smoke_run, tmp_path):
    to = tmp_path / "exp"
    to.mkdir()
    read_only(to)
    proc = dasm_without_write_rights(["export", smoke_run, "--format", "ddranking", "--to", to])
    one_line(proc, f"cannot write {to / 'images.pt'}")


def test_a_failed_ddranking_export_leaves_nothing_a_retry_refuses(smoke_run, tmp_path,
                                                                 capsys, monkeypatch):
    """The disk fills after images.pt: no file of the export is left, and a retry writes it."""
    import errno

    from dasm import io

    to, save, calls = tmp_path / "exp", io.torch_save, []

    def full_after_the_first(obj, path):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save(obj, path)

    monkeypatch.setattr(io, "torch_save", full_after_the_first)
    assert main(["export", str(smoke_run), "--format", "ddranking", "--to", str(to)]) == 2
    one_error_line(capsys, "No space left on device")
    assert list(to.iterdir()) == []
    monkeypatch.setattr(io, "torch_save", save)
    assert main(["export", str(smoke_run), "--format", "ddranking", "--to", str(to)]) == 0
    assert sorted(f.name for f in to.iterdir()) == ["images.pt", "labels.pt", "meta.json"]


def test_evaluate_prints_the_accuracy_it_could_not_save(smoke_run, tmp_path, capsys,
                                                         monkeypatch):
    from dasm import io

    run = copy_of(smoke_run, tmp_path)

    def refuse(path, obj):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(io, "write_json", refuse)
    assert main(["evaluate", str(run), "--repeats", "1"]) == 2
    captured = capsys.readouterr()
    assert "last epoch" in captured.out and "%" in captured.out, captured.out
    assert captured.err.count("\n") == 1 and str(run / "eval.json") in captured.err
    assert "could not be saved" in captured.err


def test_evaluate_keeps_an_evaluation_written_while_it_trained(smoke_run, tmp_path, monkeypatch):
    """Two evaluations of one run (another model, another process): the one that finishes
    last re-reads eval.json before writing, so the other's record survives."""
    from dasm import api, io
    from dasm.rundir import RunDir

    run = copy_of(smoke_run, tmp_path)
    before = api.evaluations(RunDir(run))
    other = {"model": "written meanwhile", "accuracies": [0.5]}
    train = api.evaluate_images

    def train_while_another_finishes(*args, **kwargs):
        summary = train(*args, **kwargs)
        io.write_json(run / "eval.json", {"evaluations": api.evaluations(RunDir(run)) + [other]})
        return summary

    monkeypatch.setattr(api, "evaluate_images", train_while_another_finishes)
    mine = api.evaluate(run, repeats=1, progress=False)
    assert api.evaluations(RunDir(run)) == before + [other, mine]


@pytest.mark.parametrize("with_model_pt", [False, True])
def test_score_refuses_a_run_of_another_dataset(smoke_run, tmp_path, capsys, with_model_pt):
    """A set (and the scorer trained on it) from another dataset of the same shape."""
    from dasm.synthetic import SyntheticSet

    run = copy_of(smoke_run, tmp_path)
    argv = ["score", "--config", SMOKE, "--model-from", str(run), "--epochs", "1"]
    if with_model_pt:
        assert main(argv + ["--out", str(tmp_path / "first.safetensors")]) == 0
        capsys.readouterr()
    sset = SyntheticSet.load(run / "synthetic.safetensors")
    sset.dataset = "mnist"  # same 1 x 28 x 28, 10 classes
    sset.save(run / "synthetic.safetensors")
    out = tmp_path / "s.safetensors"
    assert main(argv + ["--out", str(out)]) == 2
    one_error_line(capsys, "distilled from mnist", "fashion-mnist")
    assert not out.exists()


def test_score_prints_the_means_it_could_not_save(smoke_run, tmp_path, capsys, monkeypatch):
    from dasm import io

    run = copy_of(smoke_run, tmp_path)
    out = tmp_path / "s.safetensors"

    def refuse(tensors, path, metadata):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(io, "save_safetensors", refuse)
    assert main(["score", "--config", SMOKE, "--model-from", str(run), "--out", str(out),
                 "--epochs", "1"]) == 2
    captured = capsys.readouterr()
    assert "means: loss" in captured.out, captured.out
    assert captured.err.count("\n") == 1 and str(out) in captured.err
    assert (run / "model.pt").exists()


# ------------------------------------------------------ 2. a failed start locks nothing
def test_backend_that_cannot_run_leaves_the_folder_free(tmp_path, capsys):
    out = tmp_path / "run"
    # torch.compile is offered on CUDA tensors only: forced on the CPU it cannot run
    assert main(["distill", "--config", SMOKE, "--out", str(out), "--device", "cpu",
                 "--set", "backend=instance_norm_relu_pool=compile"]) == 2
    one_error_line(capsys, "compile", "instance_norm_relu_pool")
    assert not (out / "config.yaml").exists()
    assert main(["distill", "--config", SMOKE, "--out", str(out), "--device", "cpu"]) == 0


# ------------------------------------------- 3. the pre-run check sees the pools' bounds
def few_images_folder(root, per_class, size=16):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 4)):
        for c in "ab":
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")
    return root


def test_lack_pool_short_of_its_init_is_refused_before_the_run(tmp_path, capsys):
    root = few_images_folder(tmp_path / "folder", 30)
    out = tmp_path / "run"
    # IPC 30 of 30 images: two segments of 15 (factor 1); the second one's lack pool leaves
    # out the hardest 5 % (1 image), so 14 may be free for an init that needs 15
    assert main(["distill", "--config", SMOKE, "--dataset", f"imagefolder:{root}", "--ipc", "30",
                 "--set", "synthetic.factor=auto", "--set", "data.train_per_class=0",
                 "--out", str(out)]) == 2
    one_error_line(capsys, "segment 2", "dasm.tail_drop", "needs 15")
    assert not out.exists()


# ------------------------------------------ 4. what was asked is done or refused, never changed
def test_score_refuses_a_model_pt_of_other_epochs(smoke_run, tmp_path, capsys):
    run = copy_of(smoke_run, tmp_path)
    scores = tmp_path / "s.safetensors"
    argv = ["score", "--config", SMOKE, "--model-from", str(run), "--out", str(scores)]
    assert main([*argv, "--epochs", "1"]) == 0
    assert main([*argv, "--epochs", "1"]) == 0  # the same settings reuse model.pt
    before = snapshot(run)
    assert main([*argv, "--epochs", "2"]) == 2
    one_error_line(capsys, "model.pt", "epochs=1", "epochs=2")
    assert snapshot(run) == before


def test_backend_an_op_does_not_have_is_an_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--config", SMOKE, "--out", str(out),
                 "--set", "backend=decode_augment=ext"]) == 2
    one_error_line(capsys, "decode_augment", "'ext'", "triton, compile, reference")
    assert not out.exists()


def test_eval_json_records_the_seed_and_settings(smoke_run, tmp_path):
    import json

    run = copy_of(smoke_run, tmp_path)
    assert main(["evaluate", str(run), "--repeats", "1", "--set", "seed=3",
                 "--set", "eval.lr=0.02"]) == 0
    record = json.loads((run / "eval.json").read_text())["evaluations"][-1]
    assert record["seed"] == 3 and record["eval"]["lr"] == 0.02
    assert record["overrides"] == {"seed": 3, "eval.lr": 0.02}


@pytest.mark.parametrize("old, new, key", [
    ("data:\n", "seed: 1\nseed: 2\ndata:\n", "'seed'"),
    ("  epochs: 3\n", "  epochs: 3\n  epochs: 2\n", "'epochs'"),
    ("runtime:\n", "eval:\n  epochs: 2\nruntime:\n", "'eval'")])
def test_duplicate_yaml_key_is_an_error(tmp_path, capsys, old, new, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(open(SMOKE).read().replace(old, new))  # the smoke settings, a key twice
    out = tmp_path / "run"
    assert main(["distill", "--config", str(cfg), "--out", str(out)]) == 2
    one_error_line(capsys, str(cfg), key, "twice", "line ")
    assert not out.exists()


# ------------------------------------ 5. one check of a synthetic set, shared by every reader
def damage_set(path, damage):
    """Rewrite the synthetic set at ``path`` with consistent metadata but ``damage``."""
    import json

    import torch
    import torch.nn.functional as F
    from safetensors import safe_open

    from dasm import io

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    x = tensors["images"]
    if damage == "channels":  # 3 channels where the data has 1
        tensors["images"], meta["channels"] = x.repeat(1, 3, 1, 1), "3"
    elif damage == "size":
        tensors["images"] = F.interpolate(x, size=(32, 32), mode="bilinear").clamp(0, 1)
        meta["image_size"] = json.dumps([32, 32])
    else:  # stored as 8-bit 0..255
        tensors["images"] = (x * 255).round().to(torch.uint8)
    io.save_safetensors(tensors, path, meta)


@pytest.mark.parametrize("damage, needle", [("channels", "3 channels"), ("size", "(32, 32)"),
                                            ("uint8", "torch.uint8")])
@pytest.mark.parametrize("command", ["evaluate", "export", "info"])
def test_damaged_set_is_refused_by_every_reader(smoke_run, tmp_path, capsys, damage, needle,
                                                command):
    run = copy_of(smoke_run, tmp_path)
    damage_set(run / "synthetic.safetensors", damage)
    before = snapshot(run)
    extra = {"evaluate": ["--repeats", "1"], "info": [],
             "export": ["--format", "ddranking", "--to", str(tmp_path / "exp")]}[command]
    assert main([command, str(run), *extra]) == 2
    one_error_line(capsys, "synthetic.safetensors", needle)
    assert snapshot(run) == before and not (tmp_path / "exp").exists()


def test_resume_refuses_a_checkpoint_out_of_range(smoke_run, tmp_path, capsys):
    import torch

    run = copy_of(smoke_run, tmp_path)
    (run / "synthetic.safetensors").unlink()  # as if killed after its checkpoint
    ck = run / "checkpoints" / "segment_001.pt"
    state = torch.load(ck, weights_only=True)
    state["stored"] = state["stored"] * 255
    torch.save(state, ck)
    before = snapshot(run)
    assert main(["distill", "--config", SMOKE, "--out", str(run), "--resume"]) == 2
    one_error_line(capsys, "segment_001.pt", "[0, 1]")
    assert snapshot(run) == before


# ------------------------------------------------------------ 6. same seed, same bytes
def _without_times(path):
    """metrics.jsonl less its clock readings (the one thing two runs may not share)."""
    from dasm import io

    clocks = ("time", "seconds")
    return [{k: v for k, v in r.items() if k not in clocks} for r in io.read_jsonl(path)]


@pytest.mark.numerics
def test_two_runs_give_byte_identical_folders_and_exports(smoke_run, tmp_path):
    again = tmp_path / "again"
    assert main(["distill", "--config", SMOKE, "--out", str(again)]) == 0
    first = copy_of(smoke_run, tmp_path, "first")  # score writes model.pt into the run
    for run in (first, again):
        assert main(["export", str(run), "--format", "ddranking",
                     "--to", str(tmp_path / f"{run.name}-dd")]) == 0
        assert main(["score", "--config", SMOKE, "--model-from", str(run), "--epochs", "1",
                     "--out", str(tmp_path / f"{run.name}.safetensors")]) == 0
    files = sorted(str(p.relative_to(first)) for p in first.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    assert {"checkpoints/segment_001.pt", "model.pt"} <= set(files)
    for name in files:
        if name == "metrics.jsonl":
            assert _without_times(first / name) == _without_times(again / name)
        else:
            assert (first / name).read_bytes() == (again / name).read_bytes(), name
    for name in ("images.pt", "labels.pt", "meta.json"):
        assert (tmp_path / "first-dd" / name).read_bytes() == \
            (tmp_path / "again-dd" / name).read_bytes(), name


# ------------------------------------------------------------- 7. one line, and the right one
@pytest.mark.parametrize("content, needles", [
    (b"seed: 1\nmodel:\n  width: \xff\n", ["not UTF-8", "0xff"]),
    (b"seed: 1\ndata: [1, 2\n", ["not valid YAML", "line "]),
    (b"seed: !!python/object/apply:os.system ['true']\n", ["line 1", "python/object"]),
])
def test_bad_config_file_is_one_line(tmp_path, capsys, content, needles):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    out = tmp_path / "run"
    assert main(["distill", "--config", str(cfg), "--out", str(out)]) == 2
    one_error_line(capsys, str(cfg), *needles)
    assert not out.exists()


def test_config_given_a_folder_says_so(tmp_path, capsys):
    assert main(["distill", "--config", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    one_error_line(capsys, str(tmp_path), "is a folder")


def test_seeds_are_read_as_integers_never_through_a_float(tmp_path, capsys):
    from dasm.config import load_config

    big = 2 ** 53 + 1  # a float holds 2^53 + 1 as 2^53: the two seeds would collide
    assert load_config(SMOKE, extra={"seed": big}).seed == big
    assert load_config(SMOKE, [f"seed={big}"]).seed == big
    assert load_config(SMOKE, [f"seed={big}"]).identity() != \
        load_config(SMOKE, [f"seed={big - 1}"]).identity()
    assert main(["distill", "--config", SMOKE, "--seed", "99999999999999999999",
                 "--out", str(tmp_path / "run")]) == 2
    one_error_line(capsys, "got 99999999999999999999")  # the number typed, not 1e20's


@pytest.mark.parametrize("content", [b"plain", b"code"])
def test_plain_pickle_checkpoint_is_one_whole_line(smoke_run, tmp_path, content):
    import pickle

    run = copy_of(smoke_run, tmp_path)
    (run / "synthetic.safetensors").unlink()
    obj = {"stored": 1} if content == b"plain" else print
    (run / "checkpoints" / "segment_001.pt").write_bytes(pickle.dumps(obj, protocol=4))
    proc = dasm_child(["distill", "--config", SMOKE, "--out", run, "--resume"])
    one_line(proc, "segment_001.pt", "cannot be read safely (not a torch archive")
    assert proc.stderr.rstrip().endswith("delete it to recompute that segment"), proc.stderr


def test_empty_train_class_folder_is_named_in_train(tmp_path, capsys):
    root = few_images_folder(tmp_path / "folder", 3)
    (root / "train" / "d").mkdir()  # an empty class folder, and so none in test/
    assert main(["distill", "--config", SMOKE, "--dataset", f"imagefolder:{root}",
                 "--out", str(tmp_path / "run")]) == 2
    one_error_line(capsys, str(root / "train" / "d"), "no images")


def test_info_does_not_count_a_junk_checkpoint(smoke_run, tmp_path, capsys):
    import json

    run = copy_of(smoke_run, tmp_path)
    (run / "checkpoints" / "segment_002.pt").write_text("junk")
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["segments_done"] == 0 and "segment_002.pt" in shown["checkpoint_problem"]


def test_a_killed_writers_young_temporary_is_removed_on_resume(smoke_run, tmp_path):
    run = copy_of(smoke_run, tmp_path)
    (run / "synthetic.safetensors").unlink()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a writer that has exited: its process id names no process now
    young = run / f".synthetic.safetensors.{gone.pid}.k9x2ab7q.tmp"
    young.write_text("half a file")
    assert main(["distill", "--config", SMOKE, "--out", str(run), "--resume"]) == 0
    assert not young.exists()


@pytest.mark.parametrize("key", ["data.test_limit=100", "dasm.segments=3", "match.lr_img=1"])
def test_evaluate_refuses_a_key_that_made_the_set(smoke_run, tmp_path, capsys, key):
    """Such a key would be recorded in eval.json as if applied while the set stays as made."""
    run = copy_of(smoke_run, tmp_path)
    before = (run / "eval.json").read_bytes() if (run / "eval.json").exists() else None
    assert main(["evaluate", str(run), "--repeats", "1", "--set", key]) == 2
    one_error_line(capsys, repr(key.split("=")[0]), "belongs to the run")
    after = (run / "eval.json").read_bytes() if (run / "eval.json").exists() else None
    assert after == before


def test_evaluate_a_cuda_run_without_cuda_names_the_key(smoke_run, tmp_path, capsys,
                                                        monkeypatch):
    import torch

    run = copy_of(smoke_run, tmp_path)
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("device: cpu", "device: cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["evaluate", str(run), "--repeats", "1"]) == 2
    one_error_line(capsys, "'device'", "--set device=cpu")
    assert main(["evaluate", str(run), "--repeats", "1", "--set", "device=cpu"]) == 0
