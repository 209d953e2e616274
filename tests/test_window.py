"""The high-IPC switches: the difficulty window (a cross-fitted loss: no image scored by a
network that saw it; its use by every segment's pools and init; the window coreset), lack
candidates a real-data network knows (CCFS), and the partial update (SelMatch)."""
import pytest
import torch

from dasm import baselines, window
from dasm.errors import ConfigError
from dasm.plan import plan
from dasm.scoring import lack_pools

from dasm.rules import resolve_for

from conftest import smoke_config
from test_schedule import Recorder, segment_starts

SEG = ("synthetic.ipc=4", "dasm.segments=2", "dasm.window_epochs=1")


def resolved(ds, *overrides):
    return resolve_for(smoke_config(*overrides), ds)


def test_every_image_is_scored_by_the_network_that_did_not_see_it(fmnist_small, monkeypatch):
    trained, scored = [], []
    real_train, real_score = window.train_new, window.score_images

    def train(spec, images, labels, *a, **kw):
        trained.append({tuple(x.flatten().tolist()) for x in images})
        return real_train(spec, images, labels, *a, **kw)

    def score(net, images, labels, *a, **kw):
        scored.append({tuple(x.flatten().tolist()) for x in images})
        return real_score(net, images, labels, *a, **kw)

    monkeypatch.setattr(window, "train_new", train)
    monkeypatch.setattr(window, "score_images", score)
    cfg = resolved(fmnist_small, *SEG, "dasm.window_easy=0.3")
    loss = window.cross_fitted_scores(cfg, fmnist_small, "cpu")["loss"]
    assert len(trained) == len(scored) == 2
    for fit, held in zip(trained, scored):
        assert not fit & held  # no image scored by a network trained on it
    assert len(trained[0]) + len(trained[1]) >= 0.95 * len(fmnist_small.train_labels)
    assert torch.isfinite(loss).all() and (loss > 0).all()
    again = window.cross_fitted_scores(cfg, fmnist_small, "cpu")["loss"]
    assert torch.equal(loss, again)  # seeded by cfg.seed alone


def test_window_cuts_the_easy_end_of_every_class(fmnist_small):
    cfg = resolved(fmnist_small, *SEG, "dasm.window_easy=0.25", "dasm.window_hard=0.1")
    loss = window.cross_fitted_scores(cfg, fmnist_small, "cpu")["loss"]
    wins = window.class_windows(cfg, fmnist_small, {"loss": loss})
    for idx, w in zip(fmnist_small.class_index(), wins):
        assert len(w) == 40 - 10 - 4
        out = sorted(set(idx.tolist()) - set(w.tolist()))
        inside = loss[w]
        easy = [i for i in out if loss[i] <= inside.min()]
        hard = [i for i in out if loss[i] >= inside.max()]
        assert len(easy) == 10 and len(hard) == 4
    whole = window.class_windows(resolved(fmnist_small, *SEG, "dasm.window_easy=0"),
                                 fmnist_small, None)
    assert all(torch.equal(a, b) for a, b in zip(whole, fmnist_small.class_index()))
    with pytest.raises(ConfigError, match="window_easy' \\+ 'dasm.window_hard' leave no window"):
        smoke_config("dasm.window_easy=0.6", "dasm.window_hard=0.5")


@pytest.mark.parametrize("first", [True, False])
def test_segments_draw_inits_and_pools_from_the_window(fmnist_small, tmp_path, first):
    """window_first: segment 1 draws from the window as later ones do; else segment 1 takes
    the whole class and only later segments stay inside."""
    mp = pytest.MonkeyPatch()
    rec = Recorder(mp)
    try:
        distill_cfg = smoke_config(*SEG, "dasm.window_easy=0.3", "dasm.pool=lack",
                                   f"dasm.window_first={str(first).lower()}")
        from dasm.schedule import distill
        distill(distill_cfg, tmp_path / "r", dataset=fmnist_small)
    finally:
        mp.undo()
    cfg = resolve_for(distill_cfg, fmnist_small)
    wins = window.class_windows(cfg, fmnist_small, window.cross_fitted_scores(cfg, fmnist_small,
                                                                              "cpu"))
    inside = set(torch.cat(wins).tolist())
    (_, pools1, _, _), (_, pools2, _, _) = rec.inits
    assert set(torch.cat(pools2).tolist()) <= inside
    assert (set(torch.cat(pools1).tolist()) <= inside) == first
    used = rec.checkpoints[-1]["used"].nonzero().flatten().tolist()
    assert (set(used) <= inside) == first
    logged = [e for e in segment_starts(tmp_path / "r")]
    assert len(logged) == 2


def test_window_coreset_draws_inside_the_window(fmnist_small):
    cfg = resolved(fmnist_small, *SEG, "dasm.window_easy=0.5")
    wins = window.class_windows(cfg, fmnist_small, window.cross_fitted_scores(cfg, fmnist_small,
                                                                              "cpu"))
    sset = baselines.select_subset("window", cfg, fmnist_small)
    picks = baselines.random_picks(fmnist_small, 4, torch.Generator(), wins)
    assert all(len(p) == 4 for p in picks)
    flat = fmnist_small.train_images.float().div(255).flatten(1)
    inside = flat[torch.cat(wins)]
    for img in sset.images.flatten(0, 1).flatten(1):
        assert (inside - img).abs().amax(1).min() == 0  # every picked image is a window image
    with pytest.raises(ConfigError, match="baseline 'window' needs a window"):
        baselines.select_subset("window", resolved(fmnist_small, *SEG, "dasm.window_easy=0"),
                                fmnist_small)


def test_window_baseline_takes_the_plans_window(fmnist_small, tmp_path, monkeypatch):
    """`dasm baseline window` with window_easy auto: the window the plan picks for the config's
    IPC and segments (the baseline itself runs one segment, where auto would mean none)."""
    from dasm import plan as plan_module

    monkeypatch.setattr(plan_module, "WINDOW_MIN_IPC", 1)  # the large-phi window at IPC 4
    cfg = smoke_config(*SEG)
    assert resolved(fmnist_small, *SEG).dasm.window_easy == plan_module.WINDOW_EASY
    sset = baselines.run_baseline("window", cfg, tmp_path / "w", dataset=fmnist_small)
    saved = (tmp_path / "w" / "config.yaml").read_text()
    assert f"window_easy: {plan_module.WINDOW_EASY}" in saved
    wins = window.class_windows(resolved(fmnist_small, *SEG), fmnist_small,
                                window.cross_fitted_scores(resolved(fmnist_small, *SEG),
                                                           fmnist_small, "cpu"))
    inside = fmnist_small.train_images.float().div(255).flatten(1)[torch.cat(wins)]
    for img in sset.images.flatten(0, 1).flatten(1):
        assert (inside - img).abs().amax(1).min() == 0
    monkeypatch.setattr(plan_module, "WINDOW_MIN_IPC", 500)  # below it the plan has no window
    with pytest.raises(ConfigError, match="needs a window"):
        baselines.run_baseline("window", cfg, tmp_path / "none", dataset=fmnist_small)


def test_lack_candidates_must_be_known_to_a_real_data_network():
    """lack_known (CCFS): an image the scorer lacks counts as lacking only when the real-data
    network gets it right; the others join the rest (here coverage 0: they stay out)."""
    loss = torch.tensor([9.0, 3, 2, 1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    margin = torch.tensor([-5.0, -1, 0.5, 0.9, 4, 4, 4, 4, 4, 4])
    known = torch.ones(10, dtype=torch.bool)
    known[2] = False
    free = torch.ones(10, dtype=torch.bool)
    args = ({"loss": loss, "margin": margin}, [torch.arange(10)], 1.0, 0.1, 0.0, 1, free)
    plain, stats = lack_pools(*args, torch.Generator().manual_seed(0))
    assert set(plain[0].tolist()) == {1, 2, 3} and stats["lacking"] == [3]
    kept, stats = lack_pools(*args, torch.Generator().manual_seed(0), known=known)
    assert set(kept[0].tolist()) == {1, 3} and stats["lacking"] == [2]


def test_partial_update_keeps_a_share_real_and_moves_the_rest(fmnist_small, tmp_path):
    """distill_share 0.5: per segment the first half is distilled, the second half stays the
    selected real images, exactly (factor 1: a stored image is a training image), and sits on
    the synthetic side as a constant; the step follows the distilled count."""
    overrides = (*SEG, "synthetic.factor=1", "dasm.distill_share=0.5", "dasm.pool=rank",
                 "dasm.match_init=fresh")
    segs = plan(resolved(fmnist_small, *overrides))
    assert [(s.ipc, s.distilled, s.batch) for s in segs] == [(2, 1, (1, 1)), (2, 1, (1, 3))]
    whole = plan(resolved(fmnist_small, *overrides[:-3], "dasm.pool=rank",
                          "dasm.match_init=fresh"))
    assert segs[0].lr_img == pytest.approx(whole[0].lr_img / 2 / 0.5, rel=1e-12)
    mp = pytest.MonkeyPatch()
    rec = Recorder(mp)
    try:
        from dasm.schedule import distill
        sset = distill(smoke_config(*overrides), tmp_path / "r", dataset=fmnist_small)
    finally:
        mp.undo()
    assert [init.shape[1] for init, *_ in rec.inits] == [1, 1]  # only the distilled share moves
    real = fmnist_small.train_images.float().div(255).flatten(1)
    used = rec.checkpoints[-1]["used"]
    stored = sset.images  # [C, 4, 1, 28, 28]: slots 1 and 3 kept, 0 and 2 distilled
    for c in range(stored.shape[0]):
        for slot in (1, 3):
            gap = (real[used] - stored[c, slot].flatten()).abs().amax(1).min()
            assert gap == 0, (c, slot)
        for slot in (0, 2):
            assert (real - stored[c, slot].flatten()).abs().amax(1).min() > 0
    with pytest.raises(ConfigError, match="dasm.distill_share"):
        smoke_config("dasm.distill_share=0")


def test_a_window_too_narrow_for_the_inits_is_refused_before_the_run(fmnist_small, tmp_path):
    """40 images per class, the easiest 90 % cut: 4 left, and segment 1's init needs 2 x 4 mix
    tiles: refused by the pre-run check, naming the window, before the folder exists."""
    from dasm.schedule import distill
    with pytest.raises(ConfigError, match="difficulty window of segment 1 .*window_easy"):
        distill(smoke_config(*SEG, "dasm.window_easy=0.9"), tmp_path / "r",
                dataset=fmnist_small)
    assert not (tmp_path / "r").exists()


def test_resuming_a_finished_windowed_run_measures_no_window(fmnist_small, tmp_path):
    """--resume of a run whose segments are all done returns its set without training the
    window's networks (and without failing for want of their scores)."""
    from dasm.schedule import distill
    cfg = smoke_config(*SEG, "dasm.window_easy=0.3")
    first = distill(cfg, tmp_path / "r", dataset=fmnist_small)
    again = distill(cfg, tmp_path / "r", resume=True, dataset=fmnist_small)
    assert torch.equal(first.images, again.images)
