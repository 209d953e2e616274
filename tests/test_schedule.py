"""DASM scheduling: the segment plan, lack pools and rank bands, the scorer, conditioned and
warm-started matching networks, per-segment factors, frozen segments, disjoint inits, step
parity, resume."""
import json
import math
import shutil

import pytest
import torch

from types import SimpleNamespace

from dasm import SyntheticSet, rng, schedule
from dasm.data import to_float
from dasm.errors import ConfigError, RunDirError
from dasm.distributed import context
from dasm.draws import StepDrawer
from dasm.dsa import Strategy
from dasm.loop_engine import step_loop
from dasm.matching import Matcher, matched_parameters
from dasm.models import build_model, model_options, model_skeleton
from dasm.config import DasmConfig
from dasm.plan import (DECODED_SHARE, IPC_FACTOR1, PHI_LARGE, WINDOW_EASY, WINDOW_MIN_IPC,
                       Segment, auto_factor, auto_plan, band_for, plan, segment_sizes)
from dasm.rules import resolve, resolve_for
from dasm.rundir import RunDir
from dasm.schedule import distill
from dasm.scoring import band_pools, difficulty, lack_pools, score_dataset
from dasm.synthetic import init_mix
from dasm.train import host_state, network_optimizer, network_update, train_scorer

from conftest import smoke_config
from test_matching import assert_update_close

SEG = ("synthetic.ipc=4", "dasm.segments=2", "data.train_per_class=40")  # phi = 4/40: large
BAND = SEG + ("dasm.easy_drop=0.25", "dasm.hard_drop=0.1", "dasm.match_init=scorer",
              "dasm.window_easy=0")  # v2: a band of the whole class
V3 = SEG + ("dasm.pool=lack", "dasm.match_init=conditioned",  # every v3 piece on,
             "dasm.window_easy=0.15")  # and the window (the plan's from IPC 500)


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
        distill(smoke_config(*SEG, "dasm.easy_drop=0.9", "dasm.hard_drop=0"), tmp_path / "r",
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


def resolved(*overrides, real_per_class=40):
    return resolve(smoke_config(*overrides), "fashion-mnist", (28, 28), False, 1, real_per_class)


def test_plan_sizes_budgets_and_auto_segments():
    assert segment_sizes(10, "auto") == [10]  # below IPC 20: plain IDC
    assert segment_sizes(100, "auto") == [50, 50]
    assert segment_sizes(6, [2, 4]) == [2, 4]
    p = plan(resolved("synthetic.ipc=6", "dasm.segments=[2,4]", "dasm.iterations=[1,3]"))
    assert [(s.ipc, s.start, s.iterations) for s in p] == [(2, 0, 1), (4, 2, 3)]
    assert [s.iterations for s in plan(resolved(*SEG))] == [2, 2]  # auto: match.iterations each
    with pytest.raises(ConfigError, match="dasm.iterations"):
        smoke_config("dasm.iterations=0")
    with pytest.raises(ConfigError, match="resolve it first"):
        plan(smoke_config(*SEG))


# the held-out decision for later segments at large phi (results/accuracy-cpu-holdout-highipc.md)
LARGE_PHI_LATER_SEGMENTS = ("lack", "fresh")


def test_factor_follows_storage_not_the_kept_fraction():
    """The factor reads the set's size (IPC < 100) and its decoded share of the class
    (4 IPC <= 0.365 n), never phi alone: a 400-per-class set at IPC 10 (phi 0.025) keeps IDC's
    factor 2, which a phi rule threw away (results/plan-size-grid.json; the share bound moved
    from 0.25 to 0.365 by that file's rule 3, and results/plan-factor-share.json kept it)."""
    cases = {(10, 400): 2, (50, 400): 1, (10, 300): 2, (50, 300): 1, (50, 1000): 2,
             (91, 1000): 2, (92, 1000): 1, (99, 100000): 2, (100, 100000): 1,
             (50, None): 2, (100, None): 1}
    assert {k: auto_factor(*k) for k in cases} == cases
    # full Fashion-MNIST (6000 per class; 5000 held-out): the measured curve's factors
    assert [auto_factor(n, real) for real in (6000, 5000) for n in (10, 50, 100, 200, 500, 1000)] \
        == [2, 2, 1, 1, 1, 1] * 2
    assert (IPC_FACTOR1, DECODED_SHARE) == (100, 0.365)


def test_pools_follow_the_kept_fraction():
    """Later segments draw lack pools with fresh networks from phi = PHI_LARGE on, and from
    IPC 500 on every segment draws from the difficulty window without each class's easiest
    15 %; full pools of the whole class below PHI_LARGE; one segment stays IDC whatever phi is;
    a band asked for keeps rank pools; an explicit window wins over the plan's."""
    assert auto_plan(50, 2, 6000) == {"synthetic.factor": 2, "dasm.pool": "rank",
                                      "dasm.match_init": "fresh", "dasm.window_easy": 0.0}
    pool, init = LARGE_PHI_LATER_SEGMENTS
    assert auto_plan(1000, 2, 6000) == {"synthetic.factor": 1, "dasm.pool": pool,
                                        "dasm.match_init": init, "dasm.window_easy": 0.15}
    assert auto_plan(50, 2, 1000) == {"synthetic.factor": 2, "dasm.pool": pool,
                                      "dasm.match_init": init,
                                      "dasm.window_easy": 0.0}  # the two axes apart
    # the window from IPC 500 on, whatever the kept fraction (results/plan-window-reach.json)
    assert (WINDOW_MIN_IPC, WINDOW_EASY) == (500, 0.15)
    assert [auto_plan(n, 2, real)["dasm.window_easy"] for real in (6000, 1000)
            for n in (100, 200, 499, 500, 1000)] == [0.0, 0.0, 0.0, 0.15, 0.15] * 2
    assert auto_plan(1000, 1, 6000)["dasm.pool"] == "rank"
    assert auto_plan(1000, 1, 6000)["dasm.window_easy"] == 0.0
    edge = math.ceil(PHI_LARGE * 6000)
    assert auto_plan(edge, 2, 6000)["dasm.pool"] == "lack"
    assert auto_plan(edge - 1, 2, 6000)["dasm.pool"] == "rank"
    assert auto_plan(edge - 1, 2, 6000)["dasm.window_easy"] == 0.0
    assert auto_plan(1000, 2, None)["dasm.pool"] == "rank"  # size unknown: small phi
    small, large = resolved(*SEG, real_per_class=4000), resolved(*SEG)
    assert (small.dasm.window_easy, large.dasm.window_easy) == (0.0, 0.0)  # IPC 4 < 500
    high = ("synthetic.ipc=500", "dasm.segments=2")
    assert resolved(*high, real_per_class=1000).dasm.window_easy == 0.15
    assert resolved(*high, real_per_class=40000).dasm.window_easy == 0.0  # small phi
    assert resolved(*SEG, "dasm.window_easy=0.3").dasm.window_easy == 0.3
    assert resolved(*SEG, "dasm.window_easy=0").dasm.window_easy == 0.0
    assert (small.dasm.pool, small.dasm.match_init) == ("rank", "fresh")
    assert (large.dasm.pool, large.dasm.match_init) == LARGE_PHI_LATER_SEGMENTS
    assert resolved(*BAND).dasm.pool == "rank"
    with pytest.raises(ConfigError, match="'dasm.pool' is lack"):
        smoke_config(*SEG, "dasm.pool=lack", "dasm.easy_drop=0.2")
    # images under 16 px keep factor 1 at any size
    assert resolve(smoke_config("synthetic.factor=auto"), "digits", (8, 8), False, 1,
                   10000).synthetic.factor == 1


def test_lack_keys_apply_where_auto_picks_lack_pools():
    """Under dasm.pool: auto, lack-pool keys are accepted at any phi: kept where the plan picks
    lack pools, reset (they shape nothing) where it picks rank; an explicit rank refuses them."""
    keys = (*SEG, "dasm.pool=auto", "dasm.lack_margin=0.5", "dasm.pool_multiple=3")
    large, small = resolved(*keys), resolved(*keys, real_per_class=4000)
    assert (large.dasm.pool, large.dasm.lack_margin, large.dasm.pool_multiple) == ("lack", 0.5, 3)
    assert (small.dasm.pool, small.dasm.lack_margin, small.dasm.pool_multiple) == ("rank", 1.0, 2)
    assert small.identity() == resolved(*SEG, real_per_class=4000).identity()
    with pytest.raises(ConfigError, match="'dasm.lack_margin' shapes lack pools"):
        smoke_config(*SEG, "dasm.pool=rank", "dasm.lack_margin=0.5")


def test_odd_ipc_splits_into_two_segments():
    """segments auto: an odd IPC from 20 on runs as two segments, the first one larger, and the
    resolved config says so."""
    assert segment_sizes(21, "auto") == [11, 10]
    cfg = resolved("synthetic.ipc=21", "data.train_per_class=40")
    assert cfg.dasm.segments == [11, 10] and [s.ipc for s in plan(cfg)] == [11, 10]
    assert resolved("synthetic.ipc=20").dasm.segments == 2


def test_uneven_segments_step_as_idc_at_their_own_ipc():
    """match.lr_img (auto: IDC's rule at the largest segment's IPC) is scaled to each
    segment's IPC: the 1/4 segment of a 3/4 + 1/4 split steps as IDC at that IPC, not 3x."""
    split = plan(resolved("synthetic.ipc=8", "dasm.segments=[6,2]"))
    idc2 = resolved("synthetic.ipc=2", "dasm.segments=1").match.lr_img
    idc6 = resolved("synthetic.ipc=6", "dasm.segments=1").match.lr_img
    assert split[0].lr_img == pytest.approx(idc6, rel=1e-12)
    assert split[1].lr_img * split[1].trainable_share == pytest.approx(idc2, rel=1e-12)


def test_a_band_for_segment_one_is_refused():
    """Segment 1 always takes the full class: a per-segment list giving it a band was checked
    and then ignored; now it is refused, naming the key."""
    with pytest.raises(ConfigError, match="'dasm.easy_drop' lists 0.2 for segment 1"):
        band_for(smoke_config(*SEG, "dasm.easy_drop=[0.2,0.3]").dasm, 0, 2)
    with pytest.raises(ConfigError, match="'dasm.hard_drop' lists 0.1 for segment 1"):
        plan(resolved(*SEG, "dasm.pool=rank", "dasm.hard_drop=[0.1,0.1]"))


def test_lack_pool_never_collapses_onto_its_init():
    """A class the scorer holds firmly (no lacking image): the pool is topped up to
    dasm.pool_multiple (default) x what the init draws, so the segment's real batches never come
    only from its own starting images (the IPC 1000 failure: 4 classes of 10)."""
    n, need = 40, 6
    loss, margin = torch.linspace(0, 1, n), torch.full((n,), 8.0)  # every image held firmly
    free = torch.ones(n, dtype=torch.bool)
    multiple = DasmConfig().pool_multiple
    assert multiple >= 2
    pools, stats = lack_pools({"loss": loss, "margin": margin}, [torch.arange(n)], 1.0, 0.05,
                              0.3, need, free, torch.Generator().manual_seed(0),
                              multiple=multiple)
    assert stats["lacking"] == [0] and len(pools[0]) >= math.ceil(multiple * need)
    assert n - 1 not in pools[0].tolist()  # the loss tail stays out (int(0.05 * 40) = 2)
    seg = Segment(1, need, 0, 1, "lack", 0.0, 0.0, "fresh", 1, (need, 0), 1.0)
    used = torch.zeros(n, dtype=torch.bool)
    ds = type("D", (), {"classes": ["a"], "channels": 1, "image_size": (2, 2),
                        "train_images": torch.zeros(n, 1, 2, 2, dtype=torch.uint8)})()
    schedule._init_images(ds, pools, used, seg, need, torch.Generator().manual_seed(1))
    outside = set(pools[0].tolist()) - set(used.nonzero().flatten().tolist())
    assert len(outside) >= need  # at least as many real images to match as the init took
    # the floor stops at the class: a pool never takes the tail to reach it
    small = lack_pools({"loss": loss[:10], "margin": margin[:10]}, [torch.arange(10)], 1.0,
                       0.1, 0.3, 6, free[:10], torch.Generator().manual_seed(0), multiple=4)[0]
    assert sorted(small[0].tolist()) == list(range(9))


def test_state_dicts_kept_for_later_are_host_copies():
    """Scorer snapshots and conditioned networks are kept for a whole segment: copies on the
    CPU that share no storage with the network they came from."""
    net = torch.nn.Linear(3, 2)
    state = host_state(net)
    assert all(v.device.type == "cpu" for v in state.values())
    assert all(v.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
               for v, p in zip(state.values(), net.state_dict().values()))
    with torch.no_grad():
        net.weight.add_(1.0)
    assert not torch.equal(state["weight"], net.weight)


def test_plan_derives_the_image_step_once():
    """Segment 2's batch holds min(batch_syn, its decoded images) trainable and
    min(frozen_per_class, earlier decoded images) frozen; the step is lr_img / share."""
    cfg = resolved(*SEG, "synthetic.factor=[2,1]", "match.lr_img=0.01")
    one, two = plan(cfg)
    assert (one.factor, two.factor, one.batch, two.batch) == (2, 1, (8, 0), (2, 8))
    assert one.lr_img == 0.01 and two.trainable_share == 0.2
    assert two.lr_img == pytest.approx(0.01 / 0.2, rel=1e-12)
    off = plan(resolved(*SEG, "match.lr_img=0.01", "dasm.step_parity=false"))
    assert off[1].lr_img == 0.01


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


def test_lack_pool_on_a_constructed_case():
    """Class 0 (10 images): margins make images 0-3 lacking; image 0 is also the hardest by
    loss (the tail); coverage 0.5 adds as many random others as there are lacking ones."""
    loss = torch.tensor([9.0, 3, 2, 1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0, 0, 0, 0])
    margin = torch.tensor([-5.0, -1, 0.5, 0.9, 4, 4, 4, 4, 4, 4, 3, 3, 3, 3])
    index = [torch.arange(10), torch.arange(10, 14)]
    free = torch.ones(14, dtype=torch.bool)
    pools, stats = lack_pools({"loss": loss, "margin": margin}, index, lack_margin=1.0,
                              tail_drop=0.1, coverage=0.5, need=1, free=free,
                              generator=torch.Generator().manual_seed(0))
    got = set(pools[0].tolist())
    assert {1, 2, 3} <= got and 0 not in got  # lacking, minus the tail
    assert len(got) == 6 and got - {1, 2, 3} <= set(range(4, 10))  # + 3 random others
    assert stats["lacking"][0] == 3 and stats["coverage"][0] == 3
    # class 1 lacks nothing: topped up to what the init needs from the rest
    assert len(pools[1]) == 1 and stats["topped_up"][1] == 1
    # the top-up counts only free images: with image 1-3 taken, more come from the rest
    free[[1, 2, 3]] = False
    pools, stats = lack_pools({"loss": loss, "margin": margin}, index, 1.0, 0.1, 0.0, 2, free,
                              torch.Generator().manual_seed(0))
    assert set(pools[0].tolist()) >= {1, 2, 3} and stats["topped_up"][0] == 2
    assert 0 not in pools[0].tolist()  # never from the tail


def test_lack_fill_by_margin_on_a_constructed_case():
    """Class 0 (10 images) has one lacking image (margin < 1) and the init needs 4. fill
    margin: the free images of the rest with the smallest margins join the lacking ones until
    they are ceil((1 - coverage) * need) = 3 (image 5, margin 1.5, is taken by an earlier init
    and skipped; image 0 is the loss tail); random: the same class gets random images."""
    loss = torch.tensor([9.0, 1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    margin = torch.tensor([-5.0, 0.5, 6, 1.5, 5, 1.5, 2, 7, 8, 9])
    index, free = [torch.arange(10)], torch.ones(10, dtype=torch.bool)
    free[5] = False
    scores = {"loss": loss, "margin": margin}
    pools, stats = lack_pools(scores, index, 1.0, 0.1, 0.25, 4, free,
                              torch.Generator().manual_seed(0), fill="margin")
    got = set(pools[0].tolist())
    assert {1, 3, 6} <= got and 0 not in got  # lacking + the two least firm free ones
    assert stats["lacking"] == [1] and stats["filled"] == [2] and stats["coverage"] == [1]
    assert int(free[pools[0]].sum()) >= 4  # enough free images for the init
    # random fill of the same class: one lacking image, the rest of the pool is a seeded draw
    draws = [set(lack_pools(scores, index, 1.0, 0.1, 0.25, 4, free,
                            torch.Generator().manual_seed(s))[0][0].tolist()) for s in range(8)]
    assert all(1 in d and 0 not in d for d in draws)
    assert any(not {3, 6} <= d for d in draws)  # not the least firm ones every time
    with pytest.raises(ConfigError, match="dasm.lack_fill"):
        lack_pools(scores, index, 1.0, 0.1, 0.25, 4, free, torch.Generator(), fill="hard")


def test_lack_fill_reaches_the_lack_pools(fmnist_small, tmp_path, monkeypatch):
    """``dasm.lack_fill`` is what segment 2's lack pools are built with (the run stops there)."""
    class Stop(Exception):
        pass

    seen = []

    def spy(*args, **kw):
        seen.append(args[8] if len(args) > 8 else kw.get("fill"))
        raise Stop

    monkeypatch.setattr(schedule, "lack_pools", spy)
    with pytest.raises(Stop):
        distill(smoke_config(*SEG, "dasm.pool=lack", "dasm.lack_fill=margin"), tmp_path / "r",
                dataset=fmnist_small)
    assert seen == ["margin"]


class Recorder:
    """Wraps Matcher and training methods to record what segment 2 was given."""

    def __init__(self, monkeypatch):
        self.real, self.first_weights, self.inits, self.checkpoints = [], [], [], []
        self.conditioned = []
        orig_draw, orig_step, orig_distill = Matcher.draw, Matcher.step, Matcher.run_segment
        orig_cond = schedule.train_conditioned
        rec = self

        def draw(m, pools, n_train, n_frozen, *a, **kw):
            d = orig_draw(m, pools, n_train, n_frozen, *a, **kw)
            rec.real.append((n_frozen, d.real.clone(), [p.clone() for p in pools]))
            return d

        def step(m, model, draws, *a, **kw):
            if id(model) not in rec.seen:
                rec.seen.add(id(model))
                rec.first_weights.append({k: v.detach().clone()
                                          for k, v in model.state_dict().items()})
            return orig_step(m, model, draws, *a, **kw)

        def distill_(m, images, pools, net_pool, seg, *a, **kw):
            rec.inits.append((images.clone(), [p.clone() for p in pools], kw.get("starts"), seg))
            return orig_distill(m, images, pools, net_pool, seg, *a, **kw)

        def conditioned(cfg, ds, x, y, *a, **kw):
            states = orig_cond(cfg, ds, x, y, *a, **kw)
            rec.conditioned.append((x.clone(), y.clone(), states))
            return states

        orig_save = RunDir.save_checkpoint

        def save(run, k, state):
            rec.checkpoints.append({k2: (v.clone() if torch.is_tensor(v) else v)
                                    for k2, v in state.items()})
            return orig_save(run, k, state)

        self.seen = set()
        monkeypatch.setattr(Matcher, "draw", draw)
        monkeypatch.setattr(Matcher, "step", step)
        monkeypatch.setattr(Matcher, "run_segment", distill_)
        monkeypatch.setattr(schedule, "train_conditioned", conditioned)
        monkeypatch.setattr(RunDir, "save_checkpoint", save)


def recorded_run(tmp_path_factory, ds, name, *overrides):
    mp = pytest.MonkeyPatch()
    rec = Recorder(mp)
    out = tmp_path_factory.mktemp(name) / "run"
    try:
        sset = distill(smoke_config(*overrides), out, dataset=ds)
    finally:
        mp.undo()
    return out, sset, rec


@pytest.fixture(scope="module")
def dasm_run(tmp_path_factory, fmnist_small):
    """DASM with lack pools and conditioned networks, two segments (smoke.yaml fixes factor 2)."""
    return recorded_run(tmp_path_factory, fmnist_small, "dasm", *V3)


@pytest.fixture(scope="module")
def band_run(tmp_path_factory, fmnist_small):
    """Last round's pieces: a rank band and matching networks warm-started from the scorer."""
    return recorded_run(tmp_path_factory, fmnist_small, "band", *BAND, "dasm.warm_starts=2")


def segment_starts(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"segment_start"' in line]


def test_default_dasm_runs_the_large_phi_plan_with_step_parity(fmnist_small, tmp_path):
    """The package's defaults end to end at phi = 0.1 (no DASM key set): the plan's large-phi
    row, and each trainable image stepping as in IDC."""
    out = tmp_path / "r"
    distill(smoke_config(*SEG), out, dataset=fmnist_small)
    first, second = segment_starts(out)
    assert (first["pool"], first["match_init"]) == ("full", "fresh")
    pool, init = LARGE_PHI_LATER_SEGMENTS
    assert (second["pool"], second["match_init"]) == ("full" if pool == "rank" else pool, init)
    # step parity, computed here from the resolved config: 8 trainable (2 stored x 4 tiles,
    # batch_syn 8) and 8 frozen decoded images (2 x 4, frozen_per_class 128) per class
    base = RunDir(out).load_config().match.lr_img
    assert first["trainable_share"] == 1.0 and first["lr_img"] == base
    assert second["trainable_share"] == 0.5
    assert second["lr_img"] == pytest.approx(base / 0.5, rel=1e-12)


def test_segment_two_draws_real_batches_and_init_from_its_lack_pool(dasm_run, fmnist_small):
    out, sset, rec = dasm_run
    n_real = fmnist_small.train_images.shape[0]
    pools1, pools2 = rec.inits[0][1], rec.inits[1][1]
    # segment 1: V3's window, each class of 40 less its easiest 6 (15 %)
    assert [len(p) for p in pools1] == [40 - 6] * 10 and n_real == 400
    assert all(set(p2.tolist()) <= set(p1.tolist()) for p1, p2 in zip(pools1, pools2))
    logged = segment_starts(out)[1]
    assert [len(p) for p in pools2] == logged["pool_sizes"]
    assert all(len(p) < 40 for p in pools2)  # the hardest 5 % (2 of 40) never enter
    assert [len(p) for p in pools2] == [sum(counts) for counts in zip(
        logged["lacking"], logged["filled"], logged["coverage"], logged["topped_up"])]
    later = [(d, pools) for n_frozen, d, pools in rec.real if n_frozen > 0]
    assert later, "segment 2 drew no batches"
    for real, _ in later:
        for c, pool in enumerate(pools2):
            assert set(real[c].tolist()) <= set(pool.tolist())
    used1, used2 = rec.checkpoints[0]["used"], rec.checkpoints[1]["used"]
    new = (used2 & ~used1).nonzero().flatten()
    assert len(new) == 10 * 2 * 4
    assert set(new.tolist()) <= set(torch.cat(pools2).tolist())


def test_conditioned_networks_start_from_networks_trained_on_earlier_segments(dasm_run):
    out, sset, rec = dasm_run
    (x, y, states), = rec.conditioned  # segment 2 alone trains them
    want_x, want_y = SyntheticSet(rec.checkpoints[0]["stored"][:, :2], 2, [2]).decoded()
    assert torch.equal(x, want_x) and torch.equal(y, want_y)  # trained on decoded S_<2
    # smoke: 2 outer iterations, condition_every 2 -> one network starts both iterations
    starts = rec.inits[1][2]
    assert len(states) == 1 and len(starts) == 2 and all(s is states[0] for s in starts)
    seg2 = rec.first_weights[2:4]  # segment 2's networks: the 3rd and 4th
    for w in seg2:
        assert all(torch.equal(w[k], states[0][k]) for k in w)
    # trained, not fresh: they differ from the fresh network of segment 1's first iteration
    assert not all(torch.equal(rec.first_weights[0][k], states[0][k]) for k in states[0])


def test_band_and_scorer_warm_starts(band_run):
    out, sset, rec = band_run
    pools2 = rec.inits[1][1]
    assert [len(p) for p in pools2] == [40 - 10 - 4] * 10  # int(0.25*40), int(0.1*40) left out
    starts = rec.inits[1][2]
    assert rec.inits[0][2] is None and len(starts) == 2
    for i, w in enumerate(rec.first_weights[2:4]):
        assert all(torch.equal(w[k], starts[i % 2][k]) for k in w)


def test_frozen_segments_untouched_and_inits_disjoint(dasm_run):
    out, sset, rec = dasm_run
    first = rec.checkpoints[0]
    assert torch.equal(first["stored"][:, :2], sset.images[:, :2])
    n1 = int(first["used"].sum())
    assert n1 == 10 * 2 * 4  # 2 stored x 4 tiles per class
    assert int(rec.checkpoints[1]["used"].sum()) == 2 * n1
    assert sset.segment_sizes == [2, 2]
    assert (out / "grid_seg1.png").exists() and (out / "grid_seg2.png").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["segment_002.pt"]


def test_a_factor_per_segment(fmnist_small, tmp_path):
    """Segment 1 at factor 2, segment 2 at factor 1: inits take 8 + 2 real images per class,
    the set decodes to 8 + 2 training images per class, and the file round-trips."""
    sset = distill(smoke_config(*SEG, "synthetic.factor=[2,1]"), tmp_path / "r",
                   dataset=fmnist_small)
    assert sset.factors == [2, 1] and sset.decoded_per_class == 10
    x, y = sset.decoded()
    assert x.shape[0] == 10 * 10 and torch.equal(y, torch.arange(10).repeat_interleave(10))
    # class 0's decoded images: 8 tiles of segment 1, then segment 2's 2 images as stored
    assert torch.equal(x[8:10], sset.images[0, 2:4])
    back = SyntheticSet.load(tmp_path / "r" / "synthetic.safetensors")
    assert back.factors == [2, 1] and torch.equal(back.images, sset.images)
    starts = segment_starts(tmp_path / "r")
    assert [s["factor"] for s in starts] == [2, 1]


@pytest.mark.numerics
def idc_segment(cfg, ds, gen: torch.Generator, init: torch.Tensor) -> torch.Tensor:
    """IDC's outer loop transcribed, with no :class:`~dasm.matching.Matcher`: per outer
    iteration a fresh network from ``gen``; per inner step one draw of the step's random
    choices, IDC's per-class step (:func:`dasm.loop_engine.step_loop`: a real and a synthetic
    gradient per class, the distance, ``torch.optim.SGD`` on the images after every class),
    then the network's real-data update. ``init [C, n, ch, H, W]`` at ``synthetic.factor``."""
    m, C = cfg.match, ds.num_classes
    name, opts = model_options(cfg.model)
    mean, std = ds.mean_std(torch.device("cpu"))
    probe = model_skeleton(name, ds.channels, C, ds.image_size, **opts)
    idc = SimpleNamespace(m=m, C=C, device=torch.device("cpu"), mean=mean, std=std,
                          real_images=ds.train_images, ctx=context(),
                          matched=matched_parameters(probe, m.match_bias, m.match_fc))
    drawer = StepDrawer(m, C, Strategy.parse(m.augment), ds.image_size, gen, torch.device("cpu"))
    pools, everything = ds.class_index(), torch.arange(len(ds.train_labels))
    f = cfg.synthetic.factor[0] if isinstance(cfg.synthetic.factor, list) else cfg.synthetic.factor
    images, momentum = init.clone(), torch.zeros_like(init)
    for _ in range(m.iterations):
        model = build_model(name, ds.channels, C, ds.image_size, generator=gen, **opts)
        model.train()
        opt = network_optimizer(model, m)
        images = images.clamp(0, 1)
        for _ in range(m.inner_steps):
            draws = drawer.draw(pools, images.shape[1], 0, f, 1)
            images, momentum, _ = step_loop(idc, model, draws, images, momentum, None, m.lr_img)
            network_update(model, opt, ds.train_images, ds.train_labels, everything, m,
                           Strategy.parse(m.net_augment), mean, std, gen)
    return images.clamp(0, 1)


def test_one_segment_is_idc(fmnist_small, tmp_path):
    """K = 1 with every DASM switch on equals IDC: the seeded init draw, the mix init and IDC's
    loop transcribed without the Matcher (:func:`idc_segment`). The batched engine sums in
    another order than IDC's per-class loop, so the images agree to the engine tolerance
    (each update at its own scale, test_matching); a K = 1 run that trained a scorer or
    conditioned networks, scaled the step or drew another pool would consume other random
    numbers or move the images otherwise, and fail."""
    step = "match.lr_img=1"  # images move far past float rounding (updates ~1e-2, not 1e-4)
    on = smoke_config("dasm.segments=1", "dasm.pool=lack", "dasm.match_init=conditioned",
                      "dasm.step_parity=true", "synthetic.factor=[2]", step)
    got = distill(on, tmp_path / "on", dataset=fmnist_small)
    cfg = resolve_for(smoke_config(step), fmnist_small)
    gen = rng.generator(cfg.seed)
    index = fmnist_small.class_index()
    pick = torch.stack([i[torch.randperm(len(i), generator=gen)[:8]] for i in index])
    real = to_float(fmnist_small.train_images[pick.reshape(-1)]).reshape(10, 8, 1, 28, 28)
    init = init_mix(real, 2)
    want = idc_segment(cfg, fmnist_small, gen, init)
    assert_update_close(init, got.images, want)
    # the oracle is not blind: IDC at another image step is another set
    other = idc_segment(cfg.replace(**{"match.lr_img": cfg.match.lr_img * 2}), fmnist_small,
                        rng.generator(cfg.seed), init)
    with pytest.raises(AssertionError):
        assert_update_close(init, got.images, other)


@pytest.mark.numerics
def test_resume_after_kill_equals_uninterrupted(dasm_run, fmnist_small, tmp_path):
    out, sset, rec = dasm_run
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    # a run killed right after its first checkpoint: config and checkpoint, no grid yet
    shutil.copy(out / "config.yaml", cut / "config.yaml")
    torch.save(rec.checkpoints[0], cut / "checkpoints" / "segment_001.pt")
    resumed = distill(smoke_config(*V3), cut, resume=True, dataset=fmnist_small)
    assert torch.equal(resumed.images, sset.images)
    assert torch.equal(SyntheticSet.load(cut / "synthetic.safetensors").images, sset.images)
    assert (cut / "grid_seg1.png").exists()  # the grid the killed run never wrote


def test_resume_with_other_config_refused(dasm_run, fmnist_small):
    out, _, _ = dasm_run
    with pytest.raises(RunDirError, match="config differs in match.lr_img"):
        distill(smoke_config(*V3, "match.lr_img=0.5"), out, resume=True, dataset=fmnist_small)


def test_identity_ignores_soft_label_keys_under_hard_labels():
    """Under hard labels the temperature and the teacher shape nothing, so they do not enter a
    run's identity (a profile's T does not make hard-label records unreusable); under soft
    labels they do."""
    hard = resolved(*SEG).identity()
    assert resolved(*SEG, "eval.temperature=1").identity() == hard
    assert resolved(*SEG, "eval.teacher_epochs=7", "eval.teacher_seed=3").identity() == hard
    soft = resolved(*SEG, "eval.labels=stored").identity()
    assert soft != hard
    assert resolved(*SEG, "eval.labels=stored", "eval.temperature=1").identity() != soft
