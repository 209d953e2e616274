"""DASM scheduling: difficulty windows, scorer, frozen segments, disjoint inits, resume."""
import pytest
import torch

from dasm import SyntheticSet
from dasm.config import resolve, window_for
from dasm.errors import ConfigError, RunDirError
from dasm.schedule import distill, train_scorer
from dasm.scoring import difficulty, score_dataset, window_pools

from conftest import smoke_config

SEG = ("synthetic.ipc=4", "dasm.segments=2", "data.train_per_class=40", "dasm.easy_drop=0.25",
       "dasm.hard_drop=0.1")


def test_window_selects_exact_ranks():
    # class 0: 10 images with difficulty 9..0 (index 0 hardest); class 1: 5 images
    hardness = torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0.5, 0.1, 0.9, 0.3, 0.7])
    index = [torch.arange(10), torch.arange(10, 15)]
    pools = window_pools(hardness, index, easy_drop=0.2, hard_drop=0.1)
    # ranks easiest first: class 0 ranks 2..8 (drop 2 easiest, 1 hardest)
    assert pools[0].tolist() == [7, 6, 5, 4, 3, 2, 1]
    # class 1: n=5 -> drop int(1.0)=1 easiest and int(0.5)=0 hardest
    assert pools[1].tolist() == [13, 10, 14, 12]


def test_margin_is_inverted_and_unknown_score_rejected():
    s = {"loss": torch.tensor([1.0, 2.0]), "el2n": torch.tensor([0.1, 0.2]),
         "margin": torch.tensor([3.0, -1.0])}
    assert difficulty(s, "margin").tolist() == [-3.0, 1.0]
    with pytest.raises(ConfigError, match="unknown difficulty score"):
        difficulty(s, "entropy")


def test_empty_window_is_a_clear_error(fmnist_small, tmp_path):
    with pytest.raises(ConfigError, match="leaves no image of class 'b'"):
        window_pools(torch.arange(5.0), [torch.arange(3), torch.arange(3, 5)], 0.5, 0.5, ["a", "b"])
    # a window too narrow for a class's init is refused before the run directory is touched
    with pytest.raises(ConfigError, match="window of segment 2 .* leaves 4 images of class"):
        distill(smoke_config(*SEG[:3], "dasm.easy_drop=0.9", "dasm.hard_drop=0"), tmp_path / "r",
                dataset=fmnist_small)
    assert not (tmp_path / "r").exists()


def test_window_schedule():
    cfg = smoke_config("synthetic.ipc=6", "dasm.segments=3", "dasm.easy_drop=0.4",
                       "dasm.hard_drop=0.1")
    assert [window_for(cfg, k, 3) for k in range(3)] == [(0.0, 0.0), (0.2, 0.1), (0.4, 0.1)]
    cfg = smoke_config("synthetic.ipc=6", "dasm.segments=3", "dasm.easy_drop=[0,0.1,0.5]",
                       "dasm.hard_drop=0.1", "dasm.schedule=constant")
    assert window_for(cfg, 2, 3) == (0.5, 0.1)
    with pytest.raises(ConfigError, match="lists 3 values for 2 segments"):
        window_for(cfg.replace(**{"synthetic.ipc": 4, "dasm.segments": 2}), 1, 2)


def test_segments_must_divide_ipc():
    with pytest.raises(ConfigError, match="3 segments do not divide synthetic.ipc=4"):
        resolve(smoke_config("synthetic.ipc=4", "dasm.segments=3"), "fashion-mnist", (28, 28), False)
    with pytest.raises(ConfigError, match="sum to 5"):
        resolve(smoke_config("synthetic.ipc=4", "dasm.segments=[2,3]"), "fashion-mnist", (28, 28),
                False)


def test_scorer_gives_lower_loss_to_images_like_its_segment(fmnist_small):
    """A scorer trained on class-0/1 real images scores those classes' images lower."""
    cfg = resolve(smoke_config("model.width=16", "dasm.scorer_epochs=30"), fmnist_small.name,
                  fmnist_small.image_size, False)
    idx = fmnist_small.class_index()
    stored = torch.stack([fmnist_small.train_images[i[:10]] for i in idx]).float() / 255
    scorer = train_scorer(cfg, fmnist_small, stored, 1, torch.Generator().manual_seed(0), False)
    loss = score_dataset(scorer, fmnist_small)["loss"]
    seen = torch.cat([i[:10] for i in idx])
    unseen = torch.cat([i[10:] for i in idx])
    assert loss[seen].mean() < 0.8 * loss[unseen].mean()


@pytest.fixture(scope="module")
def dasm_run(tmp_path_factory, fmnist_small):
    out = tmp_path_factory.mktemp("dasm") / "run"
    sset = distill(smoke_config(*SEG), out, dataset=fmnist_small)
    return out, sset


def test_frozen_segments_untouched_and_inits_disjoint(dasm_run, fmnist_small):
    out, sset = dasm_run
    first = torch.load(out / "checkpoints" / "segment_001.pt", weights_only=False)
    # segment 1 is bit-identical after segment 2 was distilled
    assert torch.equal(first["stored"][:, :2], sset.images[:, :2])
    second = torch.load(out / "checkpoints" / "segment_002.pt", weights_only=False)
    used1, used2 = first["used"], second["used"]
    n1 = int(used1.sum())
    assert n1 == 10 * 2 * 4  # 2 stored x 4 tiles per class
    assert int(used2.sum()) == 2 * n1  # the second init took new images only
    assert sset.segment_sizes == [2, 2]
    assert (out / "grid_seg1.png").exists() and (out / "grid_seg2.png").exists()


def test_resume_after_kill_equals_uninterrupted(dasm_run, fmnist_small, tmp_path):
    out, sset = dasm_run
    cut = tmp_path / "cut"
    cut.mkdir()
    # a run killed after its first segment: config, metrics and the first checkpoint
    import shutil

    shutil.copy(out / "config.yaml", cut / "config.yaml")
    (cut / "checkpoints").mkdir()
    shutil.copy(out / "checkpoints" / "segment_001.pt", cut / "checkpoints")
    resumed = distill(smoke_config(*SEG), cut, resume=True, dataset=fmnist_small)
    assert torch.equal(resumed.images, sset.images)
    assert torch.equal(SyntheticSet.load(cut / "synthetic.safetensors").images, sset.images)


def test_resume_with_other_config_refused(dasm_run, fmnist_small):
    out, _ = dasm_run
    with pytest.raises(RunDirError, match="config differs in match.lr_img"):
        distill(smoke_config(*SEG, "match.lr_img=0.5"), out, resume=True, dataset=fmnist_small)
