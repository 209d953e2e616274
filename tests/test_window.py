"""The difficulty window: a cross-fitted loss (no image scored by a network that saw it), the
per-class window it gives, its use by every segment's pools and init, and the window coreset."""
import pytest
import torch

from dasm import baselines, window
from dasm.errors import ConfigError

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
    loss = window.cross_fitted_loss(cfg, fmnist_small, "cpu")
    assert len(trained) == len(scored) == 2
    for fit, held in zip(trained, scored):
        assert not fit & held  # no image scored by a network trained on it
    assert len(trained[0]) + len(trained[1]) >= 0.95 * len(fmnist_small.train_labels)
    assert torch.isfinite(loss).all() and (loss > 0).all()
    again = window.cross_fitted_loss(cfg, fmnist_small, "cpu")
    assert torch.equal(loss, again)  # seeded by cfg.seed alone


def test_window_cuts_the_easy_end_of_every_class(fmnist_small):
    cfg = resolved(fmnist_small, *SEG, "dasm.window_easy=0.25", "dasm.window_hard=0.1")
    loss = window.cross_fitted_loss(cfg, fmnist_small, "cpu")
    wins = window.class_windows(cfg, fmnist_small, "cpu")
    for idx, w in zip(fmnist_small.class_index(), wins):
        assert len(w) == 40 - 10 - 4
        out = sorted(set(idx.tolist()) - set(w.tolist()))
        inside = loss[w]
        easy = [i for i in out if loss[i] <= inside.min()]
        hard = [i for i in out if loss[i] >= inside.max()]
        assert len(easy) == 10 and len(hard) == 4
    whole = window.class_windows(resolved(fmnist_small, *SEG), fmnist_small, "cpu")
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
    wins = window.class_windows(resolve_for(distill_cfg, fmnist_small), fmnist_small, "cpu")
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
    wins = window.class_windows(cfg, fmnist_small, "cpu")
    sset = baselines.select_subset("window", cfg, fmnist_small)
    picks = baselines.random_picks(fmnist_small, 4, torch.Generator(), wins)
    assert all(len(p) == 4 for p in picks)
    flat = fmnist_small.train_images.float().div(255).flatten(1)
    inside = flat[torch.cat(wins)]
    for img in sset.images.flatten(0, 1).flatten(1):
        assert (inside - img).abs().amax(1).min() == 0  # every picked image is a window image
    with pytest.raises(ConfigError, match="baseline 'window' needs a window"):
        baselines.select_subset("window", resolved(fmnist_small, *SEG), fmnist_small)
