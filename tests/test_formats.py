"""Formats as users have them (issue 12): ImageFolders of mixed modes and sizes, exports that
round-trip, profiles that load from the command line, auto rules by what the data is."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dasm import SyntheticSet
from dasm.cli import main
from dasm.data import load_dataset
from dasm.errors import DataError
from dasm.rules import resolve

from conftest import ROOT, SMOKE, smoke_config


def write_folder(root, spec):
    """spec: {split: {class: [(mode, (w, h)), ...]}} -> PNGs with distinct content."""
    rng = np.random.default_rng(0)
    for split, classes in spec.items():
        for cname, images in classes.items():
            d = root / split / cname
            d.mkdir(parents=True)
            for i, (mode, size) in enumerate(images):
                shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                    d / f"{i}.png")
    return root


def test_imagefolder_mixed_modes_become_colour(tmp_path):
    # the first file (sorted) is grayscale; one colour image makes the whole set colour
    spec = {s: {"a": [("L", (12, 12)), ("RGB", (12, 12))], "b": [("L", (12, 12))]}
            for s in ("train", "test")}
    root = write_folder(tmp_path / "f", spec)
    ds = load_dataset(f"imagefolder:{root}")
    assert ds.channels == 3 and ds.train_images.shape == (3, 3, 12, 12)
    gray = load_dataset(f"imagefolder:{root}", channels=1)
    assert gray.channels == 1


def test_imagefolder_mixed_sizes_resized_to_the_most_common(tmp_path, capsys):
    spec = {s: {"a": [("L", (10, 10)), ("L", (10, 10))], "b": [("L", (14, 12))]}
            for s in ("train", "test")}
    root = write_folder(tmp_path / "f", spec)
    ds = load_dataset(f"imagefolder:{root}")
    assert ds.image_size == (10, 10)
    assert "10x10" in capsys.readouterr().err  # the choice is said
    assert load_dataset(f"imagefolder:{root}", image_size=16).image_size == (16, 16)


def test_imagefolder_needs_two_classes(tmp_path):
    root = write_folder(tmp_path / "f", {s: {"a": [("L", (8, 8))]} for s in ("train", "test")})
    with pytest.raises(DataError, match="at least 2"):
        load_dataset(f"imagefolder:{root}")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fmt") / "run"
    assert main(["distill", "--config", SMOKE, "--out", str(out)]) == 0
    return out


def test_imagefolder_export_reads_back(smoke_run, tmp_path):
    to = tmp_path / "exported"
    assert main(["export", str(smoke_run), "--format", "imagefolder", "--to", str(to)]) == 0
    sset = SyntheticSet.load(smoke_run / "synthetic.safetensors")
    x, y = sset.decoded()
    back = load_dataset(f"imagefolder:{to}")
    assert back.num_classes == sset.num_classes
    assert [c.split("-", 1)[1] for c in back.classes][:2] == ["T-shirt_top", "Trouser"]
    assert torch.equal(back.train_labels, y)
    assert torch.equal(back.train_images, (x.clamp(0, 1) * 255).round().to(torch.uint8))


def test_ddranking_export_says_how_to_read_it(smoke_run, tmp_path):
    to = tmp_path / "dd"
    assert main(["export", str(smoke_run), "--format", "ddranking", "--to", str(to)]) == 0
    meta = json.loads((to / "meta.json").read_text())
    sset = SyntheticSet.load(smoke_run / "synthetic.safetensors")
    assert meta["normalised"] is True and meta["ipc"] == sset.ipc and meta["factor"] == sset.factor
    x = torch.load(to / "images.pt")
    raw, _ = sset.decoded()
    mean, std = torch.tensor(meta["mean"]), torch.tensor(meta["std"])
    torch.testing.assert_close(x * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1), raw,
                               rtol=1e-5, atol=1e-5)


def test_every_profile_loads_from_the_command_line(tmp_path):
    tiny = ["--set", "data.train_per_class=20", "--set", "data.test_limit=50", "--set",
            "model.width=4", "--set", "match.iterations=1", "--set", "match.inner_steps=1",
            "--set", "match.n_data=8", "--set", "match.batch_real=4", "--set",
            "match.batch_syn=4", "--set", "synthetic.ipc=1", "--no-progress"]
    profiles = sorted(os.listdir(os.path.join(ROOT, "configs", "profiles")))
    assert {"cpu.yaml", "paper.yaml"} <= set(profiles)
    for name in profiles:
        out = tmp_path / name
        assert main(["distill", "--config", os.path.join(ROOT, "configs", "profiles", name),
                     "--out", str(out), *tiny]) == 0, name


def test_auto_rules_follow_the_data_not_its_name():
    # MNIST read from a folder gets MNIST's rule, like the built-in mnist5k
    a = resolve(smoke_config("synthetic.ipc=10"), "imagefolder:/x/mnist", (28, 28), False, 1)
    b = resolve(smoke_config("synthetic.ipc=10"), "mnist5k", (28, 28), False, 1)
    assert (a.match.metric, a.match.lr_img) == (b.match.metric, b.match.lr_img) == ("l1", 1e-4)
    colour = resolve(smoke_config("synthetic.ipc=10"), "imagefolder:/x", (32, 32), False, 3)
    assert (colour.match.metric, colour.match.lr_img) == ("mse", 5e-3)
    # small images get factor 1; IDC's datasets keep IDC's factor and rates
    assert resolve(smoke_config("synthetic.factor=auto"), "digits", (8, 8), False, 1) \
        .synthetic.factor == 1
    f = resolve(smoke_config("synthetic.factor=auto", "synthetic.ipc=10"), "fashion-mnist",
                (28, 28), False, 1)
    assert f.synthetic.factor == 2 and f.match.lr_img == pytest.approx(1e-4 * (28 / 32) ** 2)
