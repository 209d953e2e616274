"""The ``dasm`` command line.

    dasm distill  --dataset NAME --ipc N --out DIR [--config F] [--set k=v]... [--seed S]
                  [--device cpu|cuda] [--resume]
    dasm evaluate DIR [--model NAME] [--epochs N] [--repeats R] [--full-data EPOCHS]
                  [--labels hard|stored|teacher] [--teacher FILE]
    dasm relabel  DIR [--teacher FILE] [--set eval.k=v]...
    dasm baseline random|easy|hard|herding|window --dataset NAME --ipc N --out DIR [--epochs N]
    dasm export   DIR --format ddranking|imagefolder --to PATH
    dasm info     DIR
    dasm score    --dataset NAME --model-from DIR --out FILE [--epochs N]

Bad input is one line on stderr and exit status 2; nothing already written is touched.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from .errors import DasmError, UnsavedResult

# dasm.baselines.METHODS, named here so that building the parser imports no torch (test_cli)
BASELINES = ("random", "easy", "hard", "herding", "window")

if TYPE_CHECKING:
    from .config import Config


def _config_args(p: argparse.ArgumentParser, ipc: bool = True) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. match.inner_steps=10 (repeatable)")
    p.add_argument("--dataset", help="dataset name (fashion-mnist, mnist, cifar10, cifar100, svhn, "
                                     "mnist5k, digits, imagefolder:/path)")
    if ipc:
        p.add_argument("--ipc", type=int, help="images per class")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--data-root", help="dataset folder (torchvision layout)")
    p.add_argument("--download", action="store_true", default=None,
                   help="download the dataset where a network exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _load(args) -> "Config":
    from .config import load_config

    extra = {}
    for flag, key in (("dataset", "data.name"), ("ipc", "synthetic.ipc"), ("seed", "seed"),
                      ("device", "device"), ("data_root", "data.root"),
                      ("download", "data.download")):
        value = getattr(args, flag, None)
        if value is not None:
            extra[key] = value
    if getattr(args, "no_progress", False):
        extra["runtime.progress"] = False
    return load_config(args.config, args.set, extra)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other bad input) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dasm", description="Dataset distillation with DASM on IDC.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("distill", help="distil a synthetic set into a run directory")
    _config_args(d)
    d.add_argument("--out", required=True, help="run directory")
    d.add_argument("--resume", action="store_true", help="continue after the last finished segment")

    e = sub.add_parser("evaluate", help="train networks on a run's set, report test accuracy")
    e.add_argument("dir")
    e.add_argument("--model", help="evaluation network (registry name); default: the config's")
    e.add_argument("--epochs", type=int)
    e.add_argument("--repeats", type=int)
    e.add_argument("--full-data", type=int, metavar="EPOCHS",
                   help="also train the network on the full training set for EPOCHS epochs")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of this evaluation: eval.*, runtime.*, model.*, "
                        "dist.*, seed, device, backend")
    e.add_argument("--labels", choices=("hard", "stored", "teacher"),
                   help="labels to train on (eval.labels): hard, the set's stored soft labels, "
                        "or the teacher's on every augmented batch")
    e.add_argument("--teacher", metavar="FILE", help="the teacher's file (eval.teacher)")
    e.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("relabel", help="write a teacher's soft labels into a run's set")
    r.add_argument("dir")
    r.add_argument("--teacher", metavar="FILE",
                   help="the teacher's file (eval.teacher; trained and written there if absent)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the labelling (as evaluate takes), e.g. "
                        "eval.temperature=4")
    r.add_argument("--no-progress", action="store_true")

    b = sub.add_parser("baseline", help="a real-subset baseline at the same IPC")
    b.add_argument("method", choices=BASELINES)
    _config_args(b)
    b.add_argument("--out", required=True)
    b.add_argument("--epochs", type=int, help="epochs of the full-data network (easy/hard/herding)")

    x = sub.add_parser("export", help="write a run's set for other tools")
    x.add_argument("dir")
    x.add_argument("--format", required=True, choices=("ddranking", "imagefolder"))
    x.add_argument("--to", required=True)

    i = sub.add_parser("info", help="summarise a run directory")
    i.add_argument("dir")

    s = sub.add_parser("score", help="per-sample difficulty of the real training set")
    _config_args(s, ipc=False)
    s.add_argument("--model-from", required=True, help="run directory (model.pt or a synthetic set)")
    s.add_argument("--out", required=True, help="output .safetensors")
    s.add_argument("--epochs", type=int)
    return p


def _print_eval(summary: dict) -> None:
    accs = ", ".join(f"{a * 100:.2f}" for a in summary["accuracies"])
    print(f"{summary.get('method') or 'set'} ipc={summary['ipc']} factor={summary['factor']} "
          f"model={summary['model']} epochs={summary['epochs']}: "
          f"{summary['mean'] * 100:.2f} +- {summary['std'] * 100:.2f} % "
          f"(last epoch, {len(summary['accuracies'])} runs: {accs}; {summary['seconds']} s)")
    if summary.get("labels", "hard") != "hard":
        print(f"labels: {summary['labels']} soft labels of teacher {summary['teacher']}, "
              f"KL at T = {summary['temperature']:g}")
    if "full_data" in summary:
        f = summary["full_data"]
        print(f"full training set, same network, {f['epochs']} epochs: "
              f"{f['mean'] * 100:.2f} +- {f['std'] * 100:.2f} %")


def _print_means(out: str | None, means: dict) -> None:
    where = f" -> {out}" if out else ""
    print(f"scores{where} (means: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()) + ")")


def _eval_overrides(args) -> dict:
    """``--set`` items and the flags that stand for eval keys, as overrides."""
    from .coerce import parse_overrides

    overrides = parse_overrides(args.set)
    for flag, key in (("labels", "eval.labels"), ("teacher", "eval.teacher")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    if args.no_progress:
        overrides["runtime.progress"] = False
    return overrides


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import api, baselines, schedule
    from .rundir import RunDir

    if args.command == "distill":
        cfg = _load(args)
        sset = schedule.distill(cfg, args.out, resume=args.resume)
        m = RunDir(args.out).load_config().match
        print(f"distilled {sset.num_classes} x {sset.ipc} images (factor {sset.factor}, segments "
              f"{sset.segment_sizes}; metric {m.metric}, lr_img {m.lr_img:.3g}) -> "
              f"{args.out}/synthetic.safetensors")
    elif args.command == "evaluate":
        overrides = _eval_overrides(args)
        try:
            summary = api.evaluate(args.dir, args.model, args.epochs, args.repeats,
                                   args.full_data, overrides=overrides)
        except UnsavedResult as e:  # the work is done: show its result, then say what failed
            _print_eval(e.result)
            raise
        _print_eval(summary)
    elif args.command == "relabel":
        done = api.relabel(args.dir, _eval_overrides(args))
        print(f"soft labels {done['soft_labels']} of teacher {done['teacher']} (T = "
              f"{done['temperature']:g}) -> {done['path']}")
    elif args.command == "baseline":
        cfg = _load(args)
        sset = baselines.run_baseline(args.method, cfg, args.out, epochs=args.epochs)
        print(f"{args.method} subset: {sset.num_classes} x {sset.ipc} real images -> "
              f"{args.out}/synthetic.safetensors")
    elif args.command == "export":
        path = api.export(args.dir, args.format, args.to)
        print(f"exported {args.dir} as {args.format} -> {path}")
    elif args.command == "info":
        print(json.dumps(api.info(args.dir), indent=2))
    elif args.command == "score":
        cfg = _load(args)
        try:
            means = api.score(cfg, args.model_from, args.out, args.epochs)
        except UnsavedResult as e:
            _print_means(None, e.result)
            raise
        _print_means(args.out, means)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        code = run(argv)
        if "torch" in sys.modules:  # a torchrun launch: leave the process group cleanly
            from . import distributed
            distributed.shutdown()
        return code
    except DasmError as e:
        print(f"dasm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path we were given cannot be read or written
        print(f"dasm: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dasm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
