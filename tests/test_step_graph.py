"""The matching step as a CUDA graph (issue 28): warm-up, capture once, replay; a capture that
fails is said once and the step stays eager. On the CPU the same path runs with the capture
replaced (``capture=``), and a whole segment run through it equals the plain run."""
import pytest
import torch

from dasm import matching
from dasm.rules import resolve
from dasm.step_graph import GraphedStep

from conftest import random_dataset, smoke_config
from test_matching import assert_close_to_scale, start_images


def _counter():
    calls = []
    return calls, (lambda: calls.append(1))


def test_cpu_runs_the_step_eagerly():
    calls, fn = _counter()
    log = []
    step = GraphedStep(fn, torch.device("cpu"), log=log.append)
    for _ in range(3):
        step()
    assert len(calls) == 3 and step.state == "eager" and log == []


def test_warm_up_capture_once_then_replay():
    """Call 1 warms up (runs), call 2 captures (which runs nothing) and replays once, later
    calls replay: every call is one step, and the capture happens once."""
    calls, fn = _counter()
    captures, log = [], []

    def capture(f):
        captures.append(f)
        return f  # replaying re-runs the step on the same tensors

    step = GraphedStep(fn, torch.device("cpu"), log=log.append, capture=capture)
    for n in range(1, 5):
        step()
        assert len(calls) == n
    assert len(captures) == 1 and step.state == "replay"
    assert log == [{"event": "cuda_graph", "captured": True}]


def test_a_failed_capture_is_said_once_and_the_step_stays_eager(capsys):
    calls, fn = _counter()
    log = []

    def capture(f):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    step = GraphedStep(fn, torch.device("cpu"), log=log.append, capture=capture)
    for _ in range(4):
        step()
    assert len(calls) == 4 and step.state == "eager"
    assert log == [{"event": "cuda_graph", "captured": False,
                    "reason": "RuntimeError: operation not permitted when stream is capturing"}]
    assert capsys.readouterr().err.count("\n") == 1


def test_a_known_blocker_keeps_the_step_eager_without_trying(capsys):
    calls, fn = _counter()
    log = []
    step = GraphedStep(fn, torch.device("cpu"), log=log.append, blocker="the loop engine",
                       capture=lambda f: pytest.fail("captured despite the blocker"))
    step(), step()
    assert len(calls) == 2 and log[0]["captured"] is False and "loop engine" in log[0]["reason"]
    assert "loop engine" in capsys.readouterr().err


def _segment(ds, monkeypatch=None, **graph):
    """One small segment (2 outer iterations of 3 steps, a fresh network each) -> images."""
    cfg = resolve(smoke_config("match.batch_real=4", "match.batch_syn=4", "model.width=4",
                               "match.inner_steps=3", "match.n_data=1"),
                  ds.name, ds.image_size, cuda=False)
    device = graph.pop("device", "cpu")
    m = matching.Matcher(cfg, ds, torch.device(device), torch.Generator().manual_seed(0))
    if monkeypatch is not None:
        monkeypatch.setattr(matching, "GraphedStep",
                            lambda *a, **k: GraphedStep(*a, **{**k, **graph}))  # graph's win
    seg = matching.Segment(index=0, ipc=2, start=0, factor=2, pool="rank", easy_drop=0,
                           hard_drop=0, match_init="fresh", iterations=2, batch=(4, 0),
                           lr_img=cfg.match.lr_img)
    images = start_images(ds, 2).to(device)
    return m.run_segment(images, ds.class_index(), torch.arange(len(ds.train_labels)), seg)


def test_a_segment_equals_the_step_by_step_loop():
    """run_segment keeps its state in place for the graph (images, momentum, loss sum, one
    network per segment, later ones copied into it): bit for bit the plain loop of fresh
    networks, draws, steps and network updates."""
    from dasm.train import network_optimizer, network_update

    ds = random_dataset()
    got = _segment(ds)
    cfg = resolve(smoke_config("match.batch_real=4", "match.batch_syn=4", "model.width=4",
                               "match.inner_steps=3", "match.n_data=1"),
                  ds.name, ds.image_size, cuda=False)
    m = matching.Matcher(cfg, ds, torch.device("cpu"), torch.Generator().manual_seed(0))
    images = start_images(ds, 2)
    momentum = torch.zeros_like(images)
    net_pool = torch.arange(len(ds.train_labels))
    for _ in range(2):
        model = m.new_network()
        opt = network_optimizer(model, m.m)
        images = images.clamp(0, 1)
        for _ in range(3):
            draws = m.draw(ds.class_index(), 2, 0, 2, None)
            images, momentum, _ = m.step(model, draws, images, momentum, None, cfg.match.lr_img)
            network_update(model, opt, m.real_images, ds.train_labels, net_pool, m.m,
                           m.net_strategy, m.mean, m.std, m.gen)
    assert torch.equal(got, images.clamp(0, 1))


def test_a_segment_through_the_replayed_step_equals_the_plain_run(monkeypatch):
    """Replays that re-run the step on the segment's in-place state give the eager result bit
    for bit: the step reads and writes only the tensors the graph would keep."""
    ds = random_dataset()
    plain = _segment(ds)
    replayed = _segment(ds, monkeypatch, capture=lambda f: f)
    assert torch.equal(plain, replayed)


@pytest.mark.cuda
def test_cuda_graph_segment_equals_eager(monkeypatch):
    """On a GPU: the segment captured (once) and replayed equals the eager one (same draws from
    the registered device generator, same kernels)."""
    ds = random_dataset()
    log = []
    eager = _segment(ds, monkeypatch, device="cuda", blocker="eager reference run")
    graphed = _segment(ds, monkeypatch, device="cuda", log=log.append)
    assert {"event": "cuda_graph", "captured": True} in log, log
    assert_close_to_scale(graphed.cpu(), eager.cpu())
