"""Trust: no code runs from a file we read, every bad input is one line and exit status 2, and
nothing already written is lost (issue 11). Each test fails on the code before that issue."""
import os
import pickle
import shutil
import stat

import pytest
import torch

from dasm.cli import main

from conftest import SMOKE
from test_cli import snapshot

SEG2 = ["--set", "synthetic.ipc=4", "--set", "dasm.segments=2", "--set",
        "data.train_per_class=40", "--set", "dasm.easy_drop=0.25", "--set", "dasm.hard_drop=0.1"]


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dasm: error:"), err
    for n in needles:
        assert n in err, err
    return err


def unwritable(tmp_path, name):
    """A path where nothing can be written: below a read-only folder, or, for root (who writes
    anywhere), below a regular file."""
    if os.geteuid() == 0:
        (tmp_path / "f").write_text("x")
        return tmp_path / "f" / name
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return ro / name


@pytest.fixture(scope="module")
def two_segments(tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "run"
    assert main(["distill", "--config", SMOKE, "--out", str(out), *SEG2]) == 0
    return out


def interrupted_copy(run, tmp_path):
    """The run as if killed after its last checkpoint: no synthetic set."""
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    (cut / "synthetic.safetensors").unlink()
    return cut


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # would create a file when unpickled


def test_planted_pickle_checkpoint_runs_no_code(two_segments, tmp_path, capsys):
    cut = interrupted_copy(two_segments, tmp_path)
    marker = tmp_path / "pwned"
    (cut / "checkpoints" / "segment_002.pt").write_bytes(pickle.dumps(Payload(str(marker))))
    code = main(["distill", "--config", SMOKE, "--out", str(cut), "--resume", *SEG2])
    assert code == 2 and not marker.exists()
    one_error_line(capsys, "segment_002.pt", "cannot be read safely")


def test_truncated_checkpoint_is_one_line(two_segments, tmp_path, capsys):
    cut = interrupted_copy(two_segments, tmp_path)
    ck = cut / "checkpoints" / "segment_002.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    assert main(["distill", "--config", SMOKE, "--out", str(cut), "--resume", *SEG2]) == 2
    one_error_line(capsys, "segment_002.pt")


def test_stray_file_in_checkpoints_is_ignored(two_segments, tmp_path, capsys):
    cut = interrupted_copy(two_segments, tmp_path)
    (cut / "checkpoints" / "segment_old.pt").write_text("not ours")
    assert main(["info", str(cut)]) == 0
    assert '"segments_done": 2' in capsys.readouterr().out
    assert main(["distill", "--config", SMOKE, "--out", str(cut), "--resume", *SEG2]) == 0
    assert (cut / "synthetic.safetensors").exists()


def test_only_the_newest_checkpoint_is_kept(two_segments):
    assert sorted(os.listdir(two_segments / "checkpoints")) == ["segment_002.pt"]


@pytest.mark.parametrize("where", ["file", "proc", "unwritable"])
def test_unusable_out_is_one_line(tmp_path, capsys, where):
    if where == "file":
        out = tmp_path / "afile"
        out.write_text("keep me")
    elif where == "proc":
        out = "/proc/dasm-test/run"
    else:
        out = unwritable(tmp_path, "run")
    assert main(["distill", "--config", SMOKE, "--out", str(out)]) == 2
    one_error_line(capsys, str(out) if where != "unwritable" else "run")
    if where == "file":
        assert out.read_text() == "keep me"


def test_export_to_existing_file_is_one_line(two_segments, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert main(["export", str(two_segments), "--format", "ddranking", "--to", str(target)]) == 2
    one_error_line(capsys, str(target), "not a directory")
    assert target.read_text() == "keep me"


def test_all_segments_inits_counted_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "big"
    # Fashion-MNIST has 6000 training images per class; IPC 2000 x 4 tiles needs 8000
    assert main(["distill", "--config", SMOKE, "--out", str(out), "--ipc", "2000",
                 "--set", "data.train_per_class=0"]) == 2
    one_error_line(capsys, "6000", "8000")
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--epochs", "-1"), ("--epochs", "0"),
                                         ("--repeats", "0"), ("--full-data", "-1")])
def test_evaluate_rejects_non_positive(two_segments, capsys, flag, value):
    before = snapshot(two_segments)
    assert main(["evaluate", str(two_segments), flag, value]) == 2
    one_error_line(capsys, flag)
    assert snapshot(two_segments) == before


def test_corrupt_eval_json_is_kept_and_refused(two_segments, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(two_segments, run)
    (run / "eval.json").write_text('{"evaluations": [{"mean": 0.9}')  # truncated
    before = (run / "eval.json").read_text()
    assert main(["evaluate", str(run), "--repeats", "1"]) == 2
    one_error_line(capsys, "eval.json", "corrupt")
    assert (run / "eval.json").read_text() == before


def test_stale_temporaries_removed_and_umask_honoured(two_segments, tmp_path):
    cut = interrupted_copy(two_segments, tmp_path)
    stale = [cut / ".synthetic.safetensors.abc123.tmp", cut / "checkpoints" / ".segment_003.pt.x.tmp"]
    for p in stale:
        p.write_text("half a file")
        os.utime(p, (0, 0))
    foreign = cut / "notes.tmp"
    foreign.write_text("someone else's")
    old = os.umask(0o022)
    try:
        assert main(["distill", "--config", SMOKE, "--out", str(cut), "--resume", *SEG2]) == 0
    finally:
        os.umask(old)
    assert not any(p.exists() for p in stale) and foreign.exists()
    mode = stat.S_IMODE((cut / "synthetic.safetensors").stat().st_mode)
    assert mode == 0o644, oct(mode)


@pytest.mark.numerics
def test_same_seed_same_bytes(two_segments, tmp_path):
    again = tmp_path / "again"
    assert main(["distill", "--config", SMOKE, "--out", str(again), *SEG2]) == 0
    a = (two_segments / "synthetic.safetensors").read_bytes()
    assert a == (again / "synthetic.safetensors").read_bytes()


def test_checkpoints_load_without_pickle_code(two_segments):
    state = torch.load(two_segments / "checkpoints" / "segment_002.pt", weights_only=True)
    assert set(state) == {"segment", "stored", "used", "generator", "identity"}


# ------------------------------------------- bad input a new user tried (issue 16, item 5)
def test_seed_out_of_range_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["distill", "--config", SMOKE, "--seed", "99999999999999999999",
                 "--out", str(out)]) == 2
    one_error_line(capsys, "'seed'")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["missing", "shape", "nan"])
def test_checkpoint_with_right_identity_but_bad_entries(two_segments, tmp_path, capsys, damage):
    cut = interrupted_copy(two_segments, tmp_path)
    ck = cut / "checkpoints" / "segment_002.pt"
    state = torch.load(ck, weights_only=True)
    if damage == "missing":
        del state["stored"]
    elif damage == "shape":
        state["stored"] = state["stored"][:, :1]
    else:
        state["stored"][0, 0, 0, 0, 0] = float("nan")
    torch.save(state, ck)
    before = snapshot(cut)
    assert main(["distill", "--config", SMOKE, "--out", str(cut), "--resume", *SEG2]) == 2
    one_error_line(capsys, "segment_002.pt", "missing" if damage == "missing" else
                   ("expected" if damage == "shape" else "NaN"))
    assert snapshot(cut) == before


def write_png_folder(root, classes_train=("a", "b"), classes_test=("a", "b")):
    from PIL import Image

    for split, classes in (("train", classes_train), ("test", classes_test)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("L", (8, 8), 40 * i).save(root / split / c / f"{i}.png")
    return root


def test_truncated_png_names_the_file(tmp_path, capsys):
    root = write_png_folder(tmp_path / "folder")
    bad = root / "train" / "b" / "1.png"
    from PIL import Image
    import numpy as np

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])
    assert main(["distill", "--config", SMOKE, "--dataset", f"imagefolder:{root}",
                 "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys, str(bad))
    assert not (tmp_path / "r").exists()


def test_test_folder_lacking_a_class_names_it(tmp_path, capsys):
    root = write_png_folder(tmp_path / "folder", classes_test=("a",))
    assert main(["distill", "--config", SMOKE, "--dataset", f"imagefolder:{root}",
                 "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys, "test", "'b'")
    assert not (tmp_path / "r").exists()


def test_python_tag_in_config_yaml_is_one_line(two_segments, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_segments, run)
    (run / "config.yaml").write_text("seed: !!python/object/apply:os.system ['true']\n")
    before = snapshot(run)
    assert main(["evaluate", str(run)]) == 2
    one_error_line(capsys, "config.yaml", "line 1")
    assert snapshot(run) == before


def test_score_to_a_read_only_place_fails_before_training(two_segments, tmp_path, capsys):
    out = unwritable(tmp_path, "scores.safetensors")
    run = tmp_path / "run"
    shutil.copytree(two_segments, run)
    before = snapshot(run)
    assert main(["score", "--config", SMOKE, "--model-from", str(run), "--out", str(out)]) == 2
    one_error_line(capsys, "--out", str(out))
    assert snapshot(run) == before and not (run / "model.pt").exists()


def test_non_finite_synthetic_set_is_refused(two_segments, tmp_path, capsys):
    from dasm import SyntheticSet

    run = tmp_path / "run"
    shutil.copytree(two_segments, run)
    sset = SyntheticSet.load(run / "synthetic.safetensors")
    sset.images[:] = float("nan")
    sset.save(run / "synthetic.safetensors")
    before = snapshot(run)
    assert main(["evaluate", str(run)]) == 2
    one_error_line(capsys, "NaN")
    assert snapshot(run) == before
