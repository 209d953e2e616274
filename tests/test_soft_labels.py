"""Soft labels (issue 29): a teacher's logits stored in a set round-trip through save, load,
evaluate and export with their metadata; a teacher that is not the one the config names is
refused in one line; relabelling every batch with the teacher is the stored regime exactly when
nothing augments the batch (and is not when something does)."""
import json

import pytest
import torch
from safetensors import safe_open

from dasm import api, teacher
from dasm.baselines import run_baseline
from dasm.cli import main
from dasm.errors import RunDirError
from dasm.rules import resolve_for
from dasm.synthetic import SyntheticSet
from dasm.train import SoftLabels, TrainSettings, eval_model_spec, mixed_loss, predict, \
    soft_loss, train_new

from conftest import random_dataset, smoke_config

TINY = ("data.train_per_class=40", "data.test_limit=500", "model.width=4", "eval.epochs=1",
        "eval.repeats=1", "synthetic.ipc=2")


@pytest.fixture(autouse=True)
def teacher_cache(tmp_path, monkeypatch):
    """Every teacher of these tests is cached under tmp_path, never in runs/."""
    monkeypatch.setenv("DASM_TEACHERS", str(tmp_path / "teachers"))
    return tmp_path / "teachers"


def tiny_cfg(ds, *extra):
    return resolve_for(smoke_config(*TINY, *extra), ds)


def test_stored_soft_labels_round_trip(tmp_path, fmnist_small, teacher_cache):
    cfg = tiny_cfg(fmnist_small)
    run = tmp_path / "r2"
    run_baseline("random", cfg, run, dataset=fmnist_small)
    done = api.relabel(run, dataset=fmnist_small)
    key = teacher.protocol_key(teacher.teacher_config(cfg))
    assert done["teacher"] == key
    # the teacher is cached once, by identity, as safetensors (no pickle) with its identity
    cached = teacher_cache / f"{key}.safetensors"
    with safe_open(str(cached), framework="pt") as f:
        meta = f.metadata()
    assert meta["identity"] == key and meta["format"] == "dasm-teacher"
    assert json.loads(meta["recipe"])["seed"] == 0

    sset = SyntheticSet.load(run / "synthetic.safetensors")
    x, y = sset.decoded()
    assert sset.soft is not None and tuple(sset.soft.shape) == (len(y), 10)
    assert sset.extra["teacher"] == key and float(sset.extra["soft_temperature"]) == 4.0
    model, _ = teacher.load(cached, cfg, fmnist_small)
    mean, std = fmnist_small.mean_std()
    model.eval()  # the oracle: the network's plain forward on normalised images, not predict()
    with torch.no_grad():
        logits = model((x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))
    torch.testing.assert_close(sset.soft, logits, rtol=0, atol=1e-5)
    assert not torch.equal(sset.soft.argmax(1), torch.zeros_like(y))  # real logits, not zeros

    # saved again, the same bytes come back (soft labels and metadata included)
    sset.save(tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == \
        (run / "synthetic.safetensors").read_bytes()

    # evaluate reads them back and says which labels it trained on
    summary = api.evaluate(run, dataset=fmnist_small, progress=False,
                           overrides={"eval.labels": "stored"})
    assert (summary["labels"], summary["teacher"], summary["temperature"]) == ("stored", key, 4.0)
    hard = api.evaluate(run, dataset=fmnist_small, progress=False)
    assert hard["labels"] == "hard"
    with pytest.raises(RunDirError, match="temperature 4, this evaluation asks"):
        api.evaluate(run, dataset=fmnist_small, progress=False,
                     overrides={"eval.labels": "stored", "eval.temperature": 2.0})

    # export: DD-Ranking's soft_labels [N, classes] in labels.pt, class indices beside them
    out = api.export(run, "ddranking", tmp_path / "dd")
    torch.testing.assert_close(torch.load(out / "labels.pt"), sset.soft, rtol=0, atol=0)
    assert torch.equal(torch.load(out / "hard_labels.pt"), y)
    assert torch.load(out / "images.pt").shape[0] == len(y)
    info = json.loads((out / "meta.json").read_text())
    assert (info["teacher"], info["temperature"]) == (key, 4.0)
    assert "logits" in info["labels"]


def test_stored_regime_refuses_a_set_without_soft_labels(tmp_path, fmnist_small):
    run = tmp_path / "r"
    run_baseline("random", tiny_cfg(fmnist_small), run, dataset=fmnist_small)
    with pytest.raises(RunDirError, match="holds no soft labels; write them with `dasm relabel"):
        api.evaluate(run, dataset=fmnist_small, progress=False,
                     overrides={"eval.labels": "stored"})


def test_a_teacher_that_is_not_the_named_one_is_refused(tmp_path, fmnist_small, capsys):
    cfg = tiny_cfg(fmnist_small)
    path = tmp_path / "t.safetensors"
    named = cfg.replace(**{"eval.teacher": str(path)})
    teacher.load_or_train(named, fmnist_small)
    teacher.load(path, named, fmnist_small)  # the one named loads

    cases = [(named.replace(**{"eval.teacher_seed": 1}), fmnist_small,
              "seed is 0 there, 1 here"),
             (named.replace(**{"eval.teacher_epochs": 2}), fmnist_small,
              "eval.epochs is 1 there, 2 here"),
             (named.replace(**{"model.width": 8}), fmnist_small, "this evaluation names a convnet"),
             (named, random_dataset(classes=10), "was trained on 'fashion-mnist', this "
                                                 "evaluation uses 'random10'")]
    for other, ds, difference in cases:
        with pytest.raises(RunDirError) as e:
            teacher.load_or_train(other, ds)
        message = str(e.value)
        assert "\n" not in message and str(path) in message and difference in message, message

    # stored labels of one teacher are refused under a config that names another
    run = tmp_path / "r"
    run_baseline("random", cfg, run, dataset=fmnist_small)
    api.relabel(run, dataset=fmnist_small)
    with pytest.raises(RunDirError, match="holds soft labels of teacher .* names teacher"):
        api.evaluate(run, dataset=fmnist_small, progress=False,
                     overrides={"eval.labels": "stored", "eval.teacher_seed": 1})

    # on the command line: one line on stderr naming the file, exit status 2
    other = tmp_path / "other.safetensors"
    other.write_bytes(path.read_bytes())
    code = main(["evaluate", str(run), "--labels", "teacher", "--teacher", str(other),
                 "--set", "eval.teacher_seed=3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(other) in err and "seed" in err, err


def _student(ds, cfg, images, soft):
    settings = TrainSettings.from_eval(cfg.eval, 2)
    return train_new(eval_model_spec(cfg), images, torch.arange(10).repeat_interleave(
        images.shape[0] // 10), ds, settings, torch.Generator().manual_seed(5), "cpu", soft=soft)


def test_teacher_relabelling_equals_stored_without_augmentation(fmnist_small):
    ds = fmnist_small
    cfg = tiny_cfg(ds, "eval.augment=none", "eval.cutmix=0", "eval.batch=8")
    model, _ = teacher.load_or_train(cfg, ds)
    idx = torch.cat([i[:3] for i in ds.class_index()])
    images = ds.train_images[idx].float() / 255
    mean, std = ds.mean_std()
    stored = predict(model, images, mean, std)
    by_file, on_the_fly = SoftLabels(4.0, logits=stored), SoftLabels(4.0, teacher=model)

    # one batch: the same targets, so the same loss; a hard-label loss is another number
    x = (images[:8] - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    rows = torch.arange(8)
    student = _student(ds, cfg, images, None)
    a = soft_loss(student, x, rows, by_file, 0.0, torch.Generator())
    b = soft_loss(student, x, rows, on_the_fly, 0.0, torch.Generator())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    hard = mixed_loss(student, x, torch.arange(10).repeat_interleave(3)[:8], 0.0,
                      torch.Generator())
    assert abs(a.item() - hard.item()) > 1e-3

    # whole trainings: stored and teacher give the same network; hard labels another
    s1, s2, h = (_student(ds, cfg, images, soft).state_dict()
                 for soft in (by_file, on_the_fly, None))
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-4, atol=1e-5, msg=k)
    assert max(float((s1[k] - h[k]).abs().max()) for k in s1) > 1e-3

    # with augmentation the teacher labels what the student sees, so the regimes part
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    a = soft_loss(student, x, rows, by_file, 1.0, g1)
    b = soft_loss(student, x, rows, on_the_fly, 1.0, g2)
    assert abs(a.item() - b.item()) > 1e-4


def test_teacher_key_is_the_full_data_lines(fmnist_small):
    """The eval keys added for soft labels, at their neutral values, leave the key that earlier
    full-data records carry unchanged; a teacher setting changes it."""
    cfg = tiny_cfg(fmnist_small)
    d = cfg.to_dict()
    for k in teacher.LABEL_KEYS:
        del d["eval"][k]
    from dasm import rng
    before = f"{rng.derive_seed(0, json.dumps({k: d[k] for k in ('data', 'model', 'eval', 'seed')}, sort_keys=True)):016x}"  # noqa: E501
    assert teacher.protocol_key(cfg) == before
    assert teacher.protocol_key(teacher.teacher_config(cfg.replace(**{"eval.labels": "teacher"}))) \
        == before
    assert teacher.protocol_key(teacher.teacher_config(
        cfg.replace(**{"eval.teacher_seed": 2}))) != before


def test_the_sweep_evaluates_every_method_under_the_same_labels(tmp_path, fmnist_small):
    """benchmarks/accuracy.py --labels: a run's soft evaluation is its own (never taken for the
    hard one, or the other way round), stored labels are written into the set first, and a
    soft table pairs dasm with random under the same teacher."""
    from conftest import load_benchmark
    from dasm.rundir import RunDir

    accuracy = load_benchmark("accuracy")
    import _report

    cfg = tiny_cfg(fmnist_small)
    path = tmp_path / "t.safetensors"
    _, meta = teacher.load_or_train(cfg.replace(**{"eval.teacher": str(path)}), fmnist_small)
    soft = {"eval.labels": "stored", "eval.temperature": 4.0, "eval.teacher_seed": 0,
            "eval.teacher_epochs": 1, "eval.teacher": str(path), "key": meta["identity"]}
    run = RunDir(tmp_path / "r")
    run_baseline("random", cfg, run.path, dataset=fmnist_small)
    hard = accuracy.evaluation(run, fmnist_small, 1)
    assert SyntheticSet.load(run.synthetic).soft is None
    stored = accuracy.evaluation(run, fmnist_small, 1, soft)
    assert (stored["labels"], stored["teacher"]) == ("stored", meta["identity"])
    assert SyntheticSet.load(run.synthetic).extra["teacher"] == meta["identity"]
    assert accuracy.evaluation(run, fmnist_small, 1) == hard
    assert accuracy.evaluation(run, fmnist_small, 1, soft) == stored
    assert len(api.evaluations(run)) == 2
    assert not accuracy.same_labels(stored, {**soft, "eval.temperature": 2.0})

    def rec(method, mean, labels):
        return {"method": method, "ipc": 10, "seed": 0, "budget": "equal-steps",
                "accuracies": [mean], "mean": mean, "std": 0.0, "labels": labels,
                **({"teacher": meta["identity"], "temperature": 4.0} if labels != "hard" else {})}
    for labels in ("hard", "stored"):
        records = [rec("random", 0.80, labels), rec("idc", 0.79, labels), rec("dasm", 0.82, labels)]
        md = _report.markdown(records, [10], ["random", "idc", "dasm"], "test")
        assert ("dasm − random" in md) == (labels != "hard")
        assert (f"soft labels of teacher {meta['identity']}" in md) == (labels != "hard")
    assert "| dasm − random        | paired, same labels | +2.00 (n=1) |" in md


def test_a_stronger_teacher_is_its_own_network_with_its_own_identity(tmp_path, fmnist_small):
    """eval.teacher_width / eval.teacher_model: the teacher is trained, cached and checked as
    that network (not the evaluation network), its labels are refused under a config naming
    the evaluation network's teacher, and the sweep records it beside, not as, the full-data
    line. Bad values are one ConfigError naming the key."""
    from conftest import load_benchmark
    from dasm.errors import ConfigError

    cfg = tiny_cfg(fmnist_small)  # evaluation network: ConvNet of width 4
    wide = cfg.replace(**{"eval.teacher_width": 8})
    assert teacher.is_evaluation_network(cfg) and not teacher.is_evaluation_network(wide)
    assert teacher.is_evaluation_network(cfg.replace(**{"eval.teacher_width": 4}))
    key, wide_key = (teacher.protocol_key(teacher.teacher_config(c)) for c in (cfg, wide))
    assert key != wide_key

    model, meta = teacher.load_or_train(wide, fmnist_small)
    widths = {p.shape[0] for n, p in model.named_parameters() if p.dim() == 4}
    assert widths == {8}, widths  # every conv layer of the teacher: 8 channels, not 4
    assert meta["identity"] == wide_key and json.loads(meta["model_options"])["width"] == 8

    run = tmp_path / "r"
    run_baseline("random", cfg, run, dataset=fmnist_small)
    done = api.relabel(run, dataset=fmnist_small, overrides={"eval.teacher_width": 8})
    assert done["teacher"] == wide_key
    sset = SyntheticSet.load(run / "synthetic.safetensors")
    x, _ = sset.decoded()
    mean, std = fmnist_small.mean_std()
    with torch.no_grad():  # the oracle: the wide network's plain forward
        logits = model((x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))
    torch.testing.assert_close(sset.soft, logits, rtol=0, atol=1e-5)
    summary = api.evaluate(run, dataset=fmnist_small, progress=False,
                           overrides={"eval.labels": "stored", "eval.teacher_width": 8})
    assert summary["teacher"] == wide_key
    with pytest.raises(RunDirError, match=f"teacher {wide_key}, this config names teacher {key}"):
        api.evaluate(run, dataset=fmnist_small, progress=False,
                     overrides={"eval.labels": "stored"})

    # a file of the evaluation network's teacher is not the wide one: refused, naming both
    path = tmp_path / "t.safetensors"
    teacher.load_or_train(cfg.replace(**{"eval.teacher": str(path)}), fmnist_small)
    with pytest.raises(RunDirError, match='"width": 4.*names a convnet .*"width": 8'):
        teacher.load_or_train(wide.replace(**{"eval.teacher": str(path)}), fmnist_small)

    # the sweep: a stronger teacher is method `teacher`, and no network for the coresets
    accuracy = load_benchmark("accuracy")
    regime = {"eval.labels": "teacher", "eval.temperature": 1.0, "eval.teacher_seed": 0,
              "eval.teacher_epochs": 1, "eval.teacher_model": ""}
    soft = {**regime, "eval.teacher_width": 8}
    full, trec = accuracy.soft_teacher(cfg, soft, "", fmnist_small)
    assert full is None and trec["method"] == "teacher" and '"width": 8' in trec["network"]
    assert soft["key"] == wide_key
    import _report
    records = [trec] + [{"method": m, "ipc": 10, "seed": 0, "budget": "equal-steps",
                         "accuracies": [v], "mean": v, "std": 0.0, "labels": "teacher",
                         "teacher": wide_key, "temperature": 1.0}
                        for m, v in (("random", 0.80), ("dasm", 0.82))]
    md = _report.markdown(records, [10], ["random", "dasm"], "test")
    assert f"teacher {wide_key} (a {trec['network']}, {trec['mean'] * 100:.2f}% on the test" in md
    assert "Full training set" not in md  # the teacher is not the full-data line
    full, rec = accuracy.soft_teacher(cfg, {**regime, "eval.teacher_width": 0}, "", fmnist_small)
    assert full is not None and rec["method"] == "full-data" and "network" not in rec

    for bad, named in (({"eval.teacher_model": "nope"}, "'eval.teacher_model'"),
                       ({"eval.teacher_model": "mlp", "eval.teacher_width": 8},
                        "'eval.teacher_width'"),
                       ({"eval.teacher_width": -1}, "'eval.teacher_width'")):
        with pytest.raises(ConfigError, match=named):
            teacher.teacher_config(cfg.replace(**bad))
