"""Real-subset baselines and per-sample scoring from the command line."""
import torch

from dasm import SyntheticSet
from dasm.baselines import run_baseline, select_subset
from dasm.cli import main
from dasm.rules import resolve
from dasm.models import build_model
from dasm.scoring import score_dataset

from conftest import SMOKE, smoke_config


def cfg_for(ds, *o):
    return resolve(smoke_config("synthetic.ipc=3", *o), ds.name, ds.image_size, False)


def test_random_subset_is_seeded_real_images(fmnist_small, tmp_path):
    sset = run_baseline("random", smoke_config("synthetic.ipc=3"), tmp_path / "r", dataset=fmnist_small)
    assert sset.factor == 1 and sset.images.shape == (10, 3, 1, 28, 28)
    again = SyntheticSet.load(tmp_path / "r" / "synthetic.safetensors")
    assert torch.equal(again.images, sset.images)
    real = fmnist_small.train_images.float() / 255
    for c, idx in enumerate(fmnist_small.class_index()):
        for img in sset.images[c]:  # each stored image is a training image of its class
            assert (real[idx] == img).flatten(1).all(1).any()
    other = select_subset("random", cfg_for(fmnist_small).replace(seed=5), fmnist_small)
    assert not torch.equal(other.images, sset.images)


def test_easy_hard_herding_follow_the_reference_network(fmnist_small):
    cfg = cfg_for(fmnist_small)
    model = build_model("convnet", 1, 10, (28, 28), torch.Generator().manual_seed(0), width=8)
    loss = score_dataset(model, fmnist_small)["loss"]
    easy = select_subset("easy", cfg, fmnist_small, reference_model=model)
    hard = select_subset("hard", cfg, fmnist_small, reference_model=model)
    real = fmnist_small.train_images.float() / 255
    for c, idx in enumerate(fmnist_small.class_index()):
        order = idx[torch.argsort(loss[idx], stable=True)]
        torch.testing.assert_close(easy.images[c], real[order[:3]])
        torch.testing.assert_close(hard.images[c], real[order.flip(0)[:3]])
    herd = select_subset("herding", cfg, fmnist_small, reference_model=model)
    assert herd.images.shape == (10, 3, 1, 28, 28)
    assert all(len({x.numpy().tobytes() for x in herd.images[c]}) == 3
               for c in range(10))


def test_score_command_writes_all_training_images(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(["distill", "--config", SMOKE, "--out", str(out)]) == 0
    assert main(["score", "--config", SMOKE, "--model-from", str(out), "--out",
                 str(tmp_path / "s.safetensors"), "--epochs", "2"]) == 0
    scores = load_file(str(tmp_path / "s.safetensors"))
    assert set(scores) == {"loss", "el2n", "margin", "labels"}
    assert scores["loss"].shape == (200,) and (scores["loss"] >= 0).all()
    assert (out / "model.pt").exists()  # kept for the next score call
