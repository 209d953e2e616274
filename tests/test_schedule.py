"""DASM scheduling: the segment plan, difficulty bands, scorer, warm starts, frozen segments,
disjoint inits, resume."""
import shutil

import pytest
import torch

from dasm import SyntheticSet
from dasm.rules import resolve
from dasm.errors import ConfigError, RunDirError
from dasm.matching import Matcher
from dasm.plan import band_for, plan, segment_sizes
from dasm.rundir import RunDir
from dasm.schedule import distill
from dasm.scoring import band_pools, difficulty, score_dataset
from dasm.train import train_scorer

from conftest import smoke_config

SEG = ("synthetic.ipc=4", "dasm.segments=2", "data.train_per_class=40", "dasm.easy_drop=0.25",
       "dasm.hard_drop=0.1", "dasm.match_init=scorer")  # every DASM piece on


def test_band_selects_exact_ranks():
    # class 0: 10 images with difficulty 9..0 (index 0 hardest); class 1: 5 images
    hardness = torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0.5, 0.1, 0.9, 0.3, 0.7])
    index = [torch.arange(10), torch.arange(10, 15)]
    pools = band_pools(hardness, index, easy_drop=0.2, hard_drop=0.1)
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


def test_empty_band_is_a_clear_error(fmnist_small, tmp_path):
    with pytest.raises(ConfigError, match="leaves no image of class 'b'"):
        band_pools(torch.arange(5.0), [torch.arange(3), torch.arange(3, 5)], 0.5, 0.5, ["a", "b"])
    # a band too narrow for a class's init is refused before the run directory is touched
    with pytest.raises(ConfigError, match="band of segment 2 .* leaves 4 images of class"):
        distill(smoke_config(*SEG[:3], "dasm.easy_drop=0.9", "dasm.hard_drop=0"), tmp_path / "r",
                dataset=fmnist_small)
    assert not (tmp_path / "r").exists()


def test_all_inits_together_are_counted_before_the_first_segment(fmnist_small, tmp_path):
    # 3 segments of 2 stored images x 4 tiles need 24 real images per class; there are 20
    with pytest.raises(ConfigError, match="class 'T-shirt/top' has 20 .* need 24"):
        distill(smoke_config("synthetic.ipc=6", "dasm.segments=3", "dasm.easy_drop=0",
                             "dasm.hard_drop=0"), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_band_moves_to_the_hard_end():
    cfg = smoke_config("synthetic.ipc=6", "dasm.segments=3", "dasm.easy_drop=0.4",
                       "dasm.hard_drop=0.1")
    assert [band_for(cfg.dasm, k, 3) for k in range(3)] == [(0.0, 0.0), (0.2, 0.1), (0.4, 0.1)]
    cfg = smoke_config("synthetic.ipc=6", "dasm.segments=3", "dasm.easy_drop=[0,0.1,0.5]",
                       "dasm.hard_drop=0.1", "dasm.schedule=constant")
    assert band_for(cfg.dasm, 2, 3) == (0.5, 0.1)
    with pytest.raises(ConfigError, match="lists 3 values for 2 segments"):
        band_for(cfg.dasm, 1, 2)


def test_plan_sizes_budgets_and_auto_segments():
    assert segment_sizes(10, "auto") == [10]  # below IPC 20: plain IDC
    assert segment_sizes(100, "auto") == [50, 50]
    assert segment_sizes(6, [2, 4]) == [2, 4]
    cfg = smoke_config("synthetic.ipc=6", "dasm.segments=[2,4]", "dasm.iterations=[1,3]")
    p = plan(cfg)
    assert [(s.ipc, s.start, s.iterations) for s in p] == [(2, 0, 1), (4, 2, 3)]
    assert [s.iterations for s in plan(smoke_config("synthetic.ipc=4", "dasm.segments=2"))] == \
        [2, 2]  # auto: match.iterations each
    with pytest.raises(ConfigError, match="dasm.iterations"):
        smoke_config("dasm.iterations=0")


def test_segments_must_divide_ipc():
    with pytest.raises(ConfigError, match="3 segments do not divide synthetic.ipc=4"):
        resolve(smoke_config("synthetic.ipc=4", "dasm.segments=3"), "fashion-mnist", (28, 28), False)
    with pytest.raises(ConfigError, match="sum to 5"):
        resolve(smoke_config("synthetic.ipc=4", "dasm.segments=[2,3]"), "fashion-mnist", (28, 28),
                False)


def test_scorer_learns_its_segment_and_keeps_snapshots(fmnist_small):
    """A scorer trained on class-0/1 real images scores those classes' images lower; its
    snapshots are taken at evenly spaced epochs, the last equal to the final weights."""
    cfg = resolve(smoke_config("model.width=16", "dasm.scorer_epochs=30"), fmnist_small.name,
                  fmnist_small.image_size, False)
    idx = fmnist_small.class_index()
    seen = torch.cat([i[:10] for i in idx])
    x, y = fmnist_small.train_images[seen].float() / 255, fmnist_small.train_labels[seen]
    scorer, snaps = train_scorer(cfg, fmnist_small, x, y, torch.Generator().manual_seed(0),
                                 "cpu", snapshots=3)
    loss = score_dataset(scorer, fmnist_small)["loss"]
    unseen = torch.cat([i[10:] for i in idx])
    assert loss[seen].mean() < 0.8 * loss[unseen].mean()
    assert len(snaps) == 3
    final = scorer.state_dict()
    assert all(torch.equal(snaps[-1][k], final[k]) for k in final)
    assert not all(torch.equal(snaps[0][k], final[k]) for k in final)


class Recorder:
    """Wraps Matcher methods to record what segment 2 was given."""

    def __init__(self, monkeypatch):
        self.real, self.first_weights, self.inits, self.checkpoints = [], [], [], []
        orig_draw, orig_step, orig_distill = Matcher.draw, Matcher.step, Matcher.run_segment
        rec = self

        def draw(m, pools, n_train, n_frozen):
            d = orig_draw(m, pools, n_train, n_frozen)
            rec.real.append((n_frozen, d.real.clone(), [p.clone() for p in pools]))
            return d

        def step(m, model, draws, images, momentum, frozen=None):
            if id(model) not in rec.seen:
                rec.seen.add(id(model))
                rec.first_weights.append({k: v.detach().clone()
                                          for k, v in model.state_dict().items()})
            return orig_step(m, model, draws, images, momentum, frozen)

        def distill_(m, images, pools, *a, **kw):
            rec.inits.append((images.clone(), [p.clone() for p in pools], kw.get("starts")))
            return orig_distill(m, images, pools, *a, **kw)

        orig_save = RunDir.save_checkpoint

        def save(run, k, state):
            rec.checkpoints.append({k2: (v.clone() if torch.is_tensor(v) else v)
                                    for k2, v in state.items()})
            return orig_save(run, k, state)

        self.seen = set()
        monkeypatch.setattr(Matcher, "draw", draw)
        monkeypatch.setattr(Matcher, "step", step)
        monkeypatch.setattr(Matcher, "run_segment", distill_)
        monkeypatch.setattr(RunDir, "save_checkpoint", save)


@pytest.fixture(scope="module")
def dasm_run(tmp_path_factory, fmnist_small):
    mp = pytest.MonkeyPatch()
    rec = Recorder(mp)
    out = tmp_path_factory.mktemp("dasm") / "run"
    try:
        sset = distill(smoke_config(*SEG, "dasm.warm_starts=2"), out, dataset=fmnist_small)
    finally:
        mp.undo()
    return out, sset, rec


def test_segment_two_draws_real_batches_and_inits_from_its_band(dasm_run, fmnist_small):
    out, sset, rec = dasm_run
    n_real = fmnist_small.train_images.shape[0]
    pools1 = rec.inits[0][1]
    pools2 = rec.inits[1][1]
    assert sum(len(p) for p in pools1) == n_real  # segment 1: the whole class
    # segment 2: 40 per class minus int(0.25*40) easiest and int(0.1*40) hardest
    assert [len(p) for p in pools2] == [40 - 10 - 4] * 10
    later = [(d, pools) for n_frozen, d, pools in rec.real if n_frozen > 0]
    assert later, "segment 2 drew no batches"
    for real, _ in later:
        for c, pool in enumerate(pools2):
            assert set(real[c].tolist()) <= set(pool.tolist())
    # its init took images of its band only, none that segment 1's init took
    used1, used2 = rec.checkpoints[0]["used"], rec.checkpoints[1]["used"]
    new = (used2 & ~used1).nonzero().flatten()
    assert len(new) == 10 * 2 * 4
    assert set(new.tolist()) <= set(torch.cat(pools2).tolist())
    # the band excludes each class's easiest images under the scorer: segment 2 pools differ
    assert not set(torch.cat(pools2).tolist()) >= set(torch.cat(pools1).tolist())


def test_warm_started_networks_hold_the_scorer_weights(dasm_run):
    out, sset, rec = dasm_run
    starts = rec.inits[1][2]
    assert rec.inits[0][2] is None and len(starts) == 2  # segment 1 starts fresh
    # smoke config: 2 outer iterations per segment; segment 2's networks are the 3rd and 4th
    seg2 = rec.first_weights[2:4]
    for i, w in enumerate(seg2):
        assert all(torch.equal(w[k], starts[i % 2][k]) for k in w)
    assert not all(torch.equal(rec.first_weights[0][k], starts[0][k]) for k in starts[0])


def test_frozen_segments_untouched_and_inits_disjoint(dasm_run):
    out, sset, rec = dasm_run
    first = rec.checkpoints[0]
    # segment 1 is bit-identical after segment 2 was distilled
    assert torch.equal(first["stored"][:, :2], sset.images[:, :2])
    n1 = int(first["used"].sum())
    assert n1 == 10 * 2 * 4  # 2 stored x 4 tiles per class
    assert int(rec.checkpoints[1]["used"].sum()) == 2 * n1  # the second init took new images
    assert sset.segment_sizes == [2, 2]
    assert (out / "grid_seg1.png").exists() and (out / "grid_seg2.png").exists()
    # only the newest checkpoint is kept: it holds everything resume needs
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["segment_002.pt"]


def test_one_segment_is_idc_bit_for_bit(fmnist_small, tmp_path):
    """K = 1 with every DASM piece on equals the same run with every piece off."""
    on = distill(smoke_config("dasm.segments=1", "dasm.match_init=scorer", "dasm.step_parity=true",
                              "dasm.easy_drop=0.5", "dasm.hard_drop=0.02"), tmp_path / "on",
                 dataset=fmnist_small)
    off = distill(smoke_config("dasm.segments=1", "dasm.match_init=fresh", "dasm.step_parity=false",
                               "dasm.easy_drop=0", "dasm.hard_drop=0"), tmp_path / "off",
                  dataset=fmnist_small)
    assert torch.equal(on.images, off.images)


def test_resume_after_kill_equals_uninterrupted(dasm_run, fmnist_small, tmp_path):
    out, sset, rec = dasm_run
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    # a run killed after its first segment: config and the first checkpoint
    shutil.copy(out / "config.yaml", cut / "config.yaml")
    torch.save(rec.checkpoints[0], cut / "checkpoints" / "segment_001.pt")
    resumed = distill(smoke_config(*SEG, "dasm.warm_starts=2"), cut, resume=True,
                      dataset=fmnist_small)
    assert torch.equal(resumed.images, sset.images)
    assert torch.equal(SyntheticSet.load(cut / "synthetic.safetensors").images, sset.images)


def test_resume_with_other_config_refused(dasm_run, fmnist_small):
    out, _, _ = dasm_run
    with pytest.raises(RunDirError, match="config differs in match.lr_img"):
        distill(smoke_config(*SEG, "dasm.warm_starts=2", "match.lr_img=0.5"), out, resume=True,
                dataset=fmnist_small)
