"""Real-subset baselines and per-sample scoring from the command line."""
import torch
import torch.nn.functional as F

from dasm import SyntheticSet
from dasm.baselines import run_baseline, select_subset
from dasm.cli import main
from dasm.data import load_dataset, normalize
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
    # herding: the first pick is the image nearest the class's mean feature, and the picks'
    # mean feature is nearer the class mean than a random draw's
    mean, std = fmnist_small.mean_std()
    with torch.no_grad():
        phi = model.eval().embed(normalize(real, mean, std))
        herd_phi = model.embed(normalize(herd.images.flatten(0, 1), mean, std)).view(10, 3, -1)
    g = torch.Generator().manual_seed(0)
    for c, idx in enumerate(fmnist_small.class_index()):
        mu = phi[idx].mean(0)
        torch.testing.assert_close(herd_phi[c, 0], phi[idx][(phi[idx] - mu).norm(dim=1).argmin()])
        rand = phi[idx[torch.randperm(len(idx), generator=g)[:3]]].mean(0)
        assert (herd_phi[c].mean(0) - mu).norm() <= (rand - mu).norm()


def test_score_command_writes_all_training_images(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(["distill", "--config", SMOKE, "--out", str(out)]) == 0
    assert main(["score", "--config", SMOKE, "--model-from", str(out), "--out",
                 str(tmp_path / "s.safetensors"), "--epochs", "2"]) == 0
    scores = load_file(str(tmp_path / "s.safetensors"))
    assert set(scores) == {"loss", "el2n", "margin", "labels"}
    assert scores["loss"].shape == (200,)
    assert (out / "model.pt").exists()  # kept for the next score call
    # the scores are those of the saved network on every training image, computed here directly
    ds = load_dataset("fashion-mnist", train_per_class=20, test_limit=500)
    model = build_model("convnet", 1, 10, (28, 28), torch.Generator(), width=8)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True)["state"])
    mean, std = ds.mean_std()
    with torch.no_grad():
        logits = model.eval()(normalize(ds.train_images.float() / 255, mean, std))
    y = ds.train_labels
    torch.testing.assert_close(scores["labels"], y)
    torch.testing.assert_close(scores["loss"], F.cross_entropy(logits, y, reduction="none"),
                               rtol=1e-4, atol=1e-5)
    p = logits.softmax(1)
    torch.testing.assert_close(scores["el2n"], (p - F.one_hot(y, 10)).norm(dim=1), rtol=1e-4,
                               atol=1e-5)
    other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
    torch.testing.assert_close(scores["margin"], logits.gather(1, y[:, None])[:, 0] - other,
                               rtol=1e-4, atol=1e-4)
