"""GPU benchmarks of the Triton kernels and the matching step (docs/protocol.md, issues 5 and 13).

Each op against its reference (eager) and ``torch.compile`` of the reference, forward and
forward+backward (the fused block also with the double backward matching needs),
``triton.testing.do_bench`` medians, and the fraction of the measured device-to-device copy
bandwidth reached; then the matching step of the last segment at IPC 50 and 1000 (every frozen
image in the step) per backend and class batching: ms, class-steps/s, max memory allocated.

    python benchmarks/kernels.py [--out results/kernels-gpu.json] [--quick]
    python benchmarks/kernels.py --table-from results/gpu/kernels-gpu.json [more.json ...]

A measurement also writes ``auto-table.json`` beside ``--out``: per shape class (op, pass, and
the metric or dtype where they differ), each backend's median milliseconds and the fastest.
``--table-from`` (no GPU needed) merges measurement files into ``results/gpu/auto-table.json``
and writes it as :mod:`dasm.autotable`, which ``auto`` reads on CUDA (dasm/ops.py).
"""
from __future__ import annotations

import argparse
import json
import os
import pprint
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine, table  # noqa: E402

from dasm import io  # noqa: E402


def bench(fn, warmup=10, rep=50):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")  # milliseconds


def copy_bandwidth(nbytes=2 ** 30):
    x = torch.empty(nbytes // 4, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * nbytes / (ms * 1e-3) / 1e9  # GB/s (read + write)


def compiled(fn):
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # noqa: BLE001
        print(f"torch.compile unavailable: {e}")
        return None


def time_variants(name, variants, nbytes, bw, rows, backward=None):
    """variants: label -> callable (forward); backward(label) -> callable for fwd+bwd or None."""
    for label, fn in variants.items():
        if fn is None:
            continue
        try:
            ms = bench(fn)
        except Exception as e:  # noqa: BLE001
            rows.append({"op": name, "variant": label, "pass": "fwd", "error": str(e)[:80]})
            continue
        rows.append({"op": name, "variant": label, "pass": "fwd", "ms": round(ms, 4),
                     "GB/s": round(nbytes / (ms * 1e-3) / 1e9, 1),
                     "of copy bw": f"{nbytes / (ms * 1e-3) / 1e9 / bw * 100:.0f}%"})
        if backward is not None:
            fb = backward(label)
            if fb is not None:
                try:
                    ms = bench(fb)
                    rows.append({"op": name, "variant": label, "pass": "fwd+bwd",
                                 "ms": round(ms, 4)})
                except Exception as e:  # noqa: BLE001
                    rows.append({"op": name, "variant": label, "pass": "fwd+bwd",
                                 "error": str(e)[:80]})


def bench_sample_scores(bw, rows, n=1 << 24, k=10):
    from dasm import ops
    from dasm.kernels import sample_scores as ks

    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(n, k, device="cuda").to(dtype)
        labels = torch.randint(0, k, (n,), device="cuda")
        ref = ops.reference("sample_scores")
        nbytes = logits.numel() * logits.element_size() + labels.numel() * 8 + 3 * n * 4
        time_variants(f"sample_scores {str(dtype)[6:]} N={n} K={k}",
                      {"eager": lambda: ref(logits, labels),
                       "compile": (lambda c: (lambda: c(logits, labels)))(compiled(ref)),
                       "triton": lambda: ks.sample_scores(logits, labels)}, nbytes, bw, rows)


def bench_grad_distance(bw, rows, classes=10):
    from dasm import ops
    from dasm.kernels import grad_distance as kd

    shapes = [(128, 1, 3, 3), (128, 128, 3, 3), (128, 128, 3, 3)]
    layout = ops.GradLayout.from_shapes(["a", "b", "c"], shapes)
    gr = torch.randn(classes, layout.numel, device="cuda")
    gs0 = torch.randn(classes, layout.numel, device="cuda")
    ref = ops.reference("grad_distance")
    for metric in ("l1", "mse", "cos"):
        gs = gs0.clone().requires_grad_()
        comp = compiled(lambda a, b: ref(a, b, layout, metric))
        impl = {"eager": lambda: ref(gr, gs, layout, metric),
                "compile": (lambda: comp(gr, gs)) if comp else None,
                "triton": lambda: kd.grad_distance(gr, gs, layout, metric)}

        def fb(label, impl=impl):
            f = impl.get(label)
            return None if f is None else (lambda: f().sum().backward())

        time_variants(f"grad_distance {metric} C={classes}", impl, 2 * gr.numel() * 4, bw, rows,
                      backward=fb)


def bench_decode_augment(bw, rows, stored_n=2048, factor=2, size=28):
    from dasm import dsa, ops
    from dasm.dsa import Strategy
    from dasm.kernels import decode_augment as kda

    g = torch.Generator().manual_seed(0)
    stored = torch.rand(stored_n, 1, size, size, device="cuda").requires_grad_()
    M = stored_n * factor * factor
    mean, std = torch.tensor([0.2861], device="cuda"), torch.tensor([0.353], device="cuda")
    ref = ops.reference("decode_augment")
    for strategy in ("color_crop_cutout", "color_crop_cutout_flip_scale_rotate"):
        p = dsa.draw(Strategy.parse(strategy), M, (size, size), g).to("cuda")
        comp = compiled(lambda x: ref(x, factor, None, p, mean, std))
        impl = {"eager": lambda: ref(stored, factor, None, p, mean, std),
                "compile": (lambda: comp(stored)) if comp else None,
                "triton": lambda: kda.decode_augment(stored, factor, None, p, mean, std)}

        def fb(label, impl=impl):
            f = impl.get(label)
            return None if f is None else (lambda: f().sum().backward())

        nbytes = stored.numel() * 4 + M * size * size * 4
        time_variants(f"decode_augment {strategy} M={M}", impl, nbytes, bw, rows, backward=fb)


def bench_accumulate(bw, rows, classes=10):
    """accumulate_class_grads on the ConvNet-3 layout (width 128): reference ``index_add_`` per
    layer (device rows) against the extension's one CUDA launch (host rows)."""
    from dasm import ops
    from dasm._ext import ext

    shapes = [(128, 1, 3, 3), (128, 128, 3, 3), (128, 128, 3, 3)]
    layout = ops.GradLayout.from_shapes(["a", "b", "c"], shapes)
    buffer = torch.zeros(classes, layout.numel, device="cuda")
    grads = [torch.randn(classes, *s, device="cuda") for s in shapes]
    host, dev = torch.arange(classes), torch.arange(classes, device="cuda")
    ref = ops.reference("accumulate_class_grads")
    mod = ext()
    impl = {"eager": lambda: ref(buffer, grads, layout.offsets, dev, 1.0),
            "ext": (lambda: mod.accumulate_class_grads(buffer, grads, list(layout.offsets), host,
                                                       1.0)) if mod and mod.has_cuda() else None}
    time_variants(f"accumulate_class_grads C={classes} P={layout.numel}", impl,
                  2 * buffer.numel() * 4, bw, rows)


def bench_block(bw, rows, n=512, c=128, size=28):
    """instance_norm_relu_pool: forward, fwd+bwd, and fwd+bwd+double backward (what matching
    runs); torch.compile has no double backward, so it is timed on the first two only."""
    from dasm import fused_block, ops
    from dasm.kernels import instance_norm_relu_pool as kb

    ref = ops.reference("instance_norm_relu_pool")
    z = torch.randn(n, c, size, size, device="cuda").requires_grad_()
    w = torch.rand(c, device="cuda").add_(0.5).requires_grad_()
    b = torch.randn(c, device="cuda").mul_(0.1).requires_grad_()
    comp = compiled(lambda z_, w_, b_: ref(z_, w_, b_, True, 1e-5))
    impl = {"eager": lambda: ref(z, w, b, True, 1e-5),
            "compile": (lambda: comp(z, w, b)) if comp else None,
            "triton": lambda: fused_block.instance_norm_relu_pool(z, w, b, True, 1e-5, kb)}

    def fb(label):
        f = impl.get(label)
        return None if f is None else (lambda: torch.autograd.grad(f().sum(), (z, w, b)))

    nbytes = z.numel() * 4 * 5 // 4  # read z, write the pooled output
    time_variants(f"instance_norm_relu_pool N={n} C={c} {size}x{size}", impl, nbytes, bw, rows,
                  backward=fb)
    v = torch.randn(n, c, size, size, device="cuda")
    for label in ("eager", "triton"):
        def fbb(f=impl[label]):
            out = f()
            gz, = torch.autograd.grad(out, (z,), torch.ones_like(out), create_graph=True)
            return torch.autograd.grad((gz * v).sum(), (z, w))
        try:
            rows.append({"op": f"instance_norm_relu_pool N={n} C={c} {size}x{size}",
                         "variant": label, "pass": "fwd+bwd+2bwd", "ms": round(bench(fbb), 4)})
        except Exception as e:  # noqa: BLE001
            rows.append({"op": "instance_norm_relu_pool", "variant": label,
                         "pass": "fwd+bwd+2bwd", "error": str(e)[:80]})


STEP_VARIANTS = (("reference", "vmap"), ("triton", "vmap"), ("auto", "vmap"),
                 ("auto", "sequential"), ("auto", "vmap", "graph"))
# triton: every kernel (auto before its table); graph: the step captured as a CUDA graph


def bench_matching_step(rows, ipc=50, segment=50, width=128, steps=5, variants=STEP_VARIANTS):
    """Matching steps of the last segment (``segment`` trainable, ``ipc - segment`` frozen
    stored images per class, every frozen image taking part), each drawing on the device and
    updating its images in place as in a run (dasm.matching.Matcher.run_segment), two warm-up
    steps first (the second captures the graph): ms per step and per class-step, class-steps
    per second and ``torch.cuda.max_memory_allocated``, per (backend, class batching[, graph]).
    """
    from dasm import ops
    from dasm.config import load_config
    from dasm.data import load_dataset
    from dasm.matching import Matcher
    from dasm.rules import resolve
    from dasm.step_graph import GraphedStep

    root = os.environ.get("DASM_DATA_ROOT", "data")
    ds = load_dataset("fashion-mnist", root=root)
    pools = ds.class_index()
    out = {}
    for variant in variants:
        backend, batching, graph = variant[0], variant[1], "graph" in variant[2:]
        label = "/".join(variant)
        cfg = resolve(load_config(None, [
            f"synthetic.ipc={ipc}", f"dasm.segments={ipc // segment}", f"model.width={width}",
            "device=cuda", "match.frozen_per_class=0", f"match.class_batching={batching}"]),
            ds.name, ds.image_size, True, ds.channels)
        ops.set_backend(backend)
        try:
            m = Matcher(cfg, ds, torch.device("cuda"), torch.Generator().manual_seed(0))
            m.reseed_draws()
            model = m.new_network()
            nf = ipc - segment
            images = torch.rand(10, segment, 1, 28, 28, device="cuda")
            frozen = torch.rand(10, nf, 1, 28, 28, device="cuda") if nf else None
            mom = torch.zeros_like(images)

            def one_step():
                new, new_mom, _ = m.step(model, m.draw(pools, segment, nf), images, mom, frozen)
                images.copy_(new)
                mom.copy_(new_mom)

            notes = []
            step = GraphedStep(one_step, torch.device("cuda"), (m.drawer.device_gen,), log=notes.append,
                               blocker=m._graph_blocker()) if graph else one_step
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            sec = (time.perf_counter() - t) / steps
            out[tuple(variant)] = sec
            row = {"op": f"matching step IPC {ipc} (last segment {segment}) width {width}",
                   "variant": label, "pass": "step", "ms": round(sec * 1e3, 2),
                   "class-step ms": round(sec * 1e3 / 10, 2), "class-steps/s": round(10 / sec, 1),
                   "max MB": round(torch.cuda.max_memory_allocated() / 2 ** 20)}
            if graph and not any(n.get("captured") for n in notes):
                row["error"] = f"not captured, ran eagerly: {notes[0].get('reason', '')}"[:120]
            rows.append(row)
        except Exception as e:  # noqa: BLE001
            rows.append({"op": f"matching step IPC {ipc}", "variant": label,
                         "pass": "step", "error": str(e)[:80]})
        finally:
            ops.set_backend(None)
    return out


# ======================================================================= the auto table
VARIANT_BACKEND = {"eager": "reference", "compile": "compile", "triton": "triton", "ext": "ext"}


def shape_class(row: dict) -> str | None:
    """The auto table's key of a measurement row (the shape class dasm/ops.py looks up), or
    None for rows that are no op's (the matching step)."""
    op, *rest = row["op"].split()
    if op == "sample_scores":
        return f"sample_scores/{rest[0]}"  # the dtype; forward only
    if op == "grad_distance":
        return f"grad_distance/{rest[0]}/{row['pass']}"  # the metric
    if op in ("decode_augment", "instance_norm_relu_pool"):
        return f"{op}/{row['pass']}"
    if op == "accumulate_class_grads":
        return op
    return None


def device_row(payload: dict, source: str) -> dict:
    """One device's row of the auto table from a measurement file: per shape class the summed
    median ms of each backend measured on every one of its rows, and the choice: the backend
    fastest on every row (else the fastest in total)."""
    per_row: dict[tuple, dict] = {}
    for r in payload["rows"]:
        key = shape_class(r)
        if key is None or "ms" not in r or r["variant"] not in VARIANT_BACKEND:
            continue
        per_row.setdefault((key, r["op"], r["pass"]), {})[VARIANT_BACKEND[r["variant"]]] = r["ms"]
    classes: dict[str, list[dict]] = {}
    for (key, _, _), times in per_row.items():
        classes.setdefault(key, []).append(times)
    ms, choice = {}, {}
    for key, rows in sorted(classes.items()):
        common = set.intersection(*(set(t) for t in rows))
        total = {b: round(sum(t[b] for t in rows), 4) for b in sorted(common)}
        everywhere = [b for b in total if all(t[b] <= min(t[c] for c in common) for t in rows)]
        ms[key] = total
        choice[key] = everywhere[0] if everywhere else min(total, key=total.get)
    m = payload["machine"]
    return {"source": {"file": source, "commit": m.get("commit"), "device": m.get("gpu"),
                       "torch": m.get("torch"), "triton": m.get("triton")},
            "choice": choice, "ms": ms}


def defaults(table: dict) -> dict:
    """Per shape class, for a device without a row: ``compile`` where it beat the reference on
    every device that measured both, else the reference."""
    out = {}
    for key in sorted({k for row in table.values() for k in row["ms"]}):
        pairs = [row["ms"][key] for row in table.values()
                 if key in row["ms"] and {"compile", "reference"} <= set(row["ms"][key])]
        win = pairs and all(t["compile"] < t["reference"] for t in pairs)
        out[key] = "compile" if win else "reference"
    return out


def write_table(sources: list[str], json_path="results/gpu/auto-table.json",
                module_path="dasm/autotable.py") -> dict:
    """Merge measurement files (a later one replaces an earlier row of the same device) into
    the table at ``json_path`` (rows already there kept) and write it as a module."""
    table = {}
    if json_path and os.path.exists(json_path):
        with open(json_path) as f:
            table = json.load(f)["devices"]
    for src in sources:
        with open(src) as f:
            row = device_row(json.load(f), src)
        table[row["source"]["device"]] = row
    out = {"command": "python benchmarks/kernels.py --table-from " + " ".join(
               sorted({r["source"]["file"] for r in table.values()})),
           "devices": dict(sorted(table.items())), "default": defaults(table)}
    if json_path:
        io.write_json(json_path, out)
    if module_path:
        text = ('"""Which backend ``auto`` picks on CUDA, per device name and shape class: '
                'written by\n``benchmarks/kernels.py --table-from`` (with '
                'results/gpu/auto-table.json); do not edit by hand.\n\n'
                'TABLE[device]["choice"][class] is the fastest backend measured (median ms in\n'
                'TABLE[device]["ms"], summed over the class\'s rows; the measurement file, '
                'commit and\ndevice in TABLE[device]["source"]); DEFAULT serves devices without '
                'a row.\n"""\n\n'
                f"TABLE = {pprint.pformat(out['devices'], width=99, sort_dicts=True)}\n\n"
                f"DEFAULT = {pprint.pformat(out['default'], width=99, sort_dicts=True)}\n")
        tmp = module_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, module_path)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="results/kernels-gpu.json")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--table-from", nargs="+", metavar="JSON",
                   help="write results/gpu/auto-table.json and dasm/autotable.py from these "
                        "measurement files, measure nothing")
    a = p.parse_args()
    if a.table_from:
        out = write_table(a.table_from)
        for device, row in out["devices"].items():
            print(device, row["source"]["commit"], row["choice"])
        print("default", out["default"])
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA device; nothing measured")
        return 0
    rows, machine_info = [], machine()
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw:.0f} GB/s on {torch.cuda.get_device_name()}", flush=True)
    step: dict = {}

    def save():  # after every stage, so a stage cut by its time limit leaves the ones before
        io.write_json(a.out, summary(machine_info, bw, rows, step))  # atomic

    for run in (lambda: bench_sample_scores(bw, rows, n=1 << (22 if a.quick else 24)),
                lambda: bench_grad_distance(bw, rows),
                lambda: bench_decode_augment(bw, rows, stored_n=512 if a.quick else 2048),
                lambda: bench_block(bw, rows, n=128 if a.quick else 512),
                lambda: bench_accumulate(bw, rows),
                lambda: step.update(bench_matching_step(rows, steps=3 if a.quick else 5)),
                # the last segment at IPC 1000, every frozen image in the step
                lambda: bench_matching_step(rows, ipc=1000, steps=2, variants=(
                    ("reference", "vmap"),) + tuple(v for v in STEP_VARIANTS if v[0] == "auto"))):
        run()
        save()
    cols = ["op", "variant", "pass", "ms", "class-step ms", "GB/s", "of copy bw",
            "class-steps/s", "max MB", "error"]
    print(table(rows, cols))
    print(f"-> {a.out}")
    table_path = os.path.join(os.path.dirname(os.path.abspath(a.out)), "auto-table.json")
    write_table([a.out], json_path=table_path, module_path=None)
    print(f"-> {table_path} (into the package: python benchmarks/kernels.py --table-from "
          f"{a.out})")
    return 0


def summary(machine_info: dict, bw: float, rows: list[dict], step: dict) -> dict:
    """The results file: every row, and the issue-28 figures of the fastest ``auto`` step at
    IPC 50 (its speed-up over the reference, ms per class-step, max memory at IPC 1000 over
    IPC 50)."""
    best = min(((v, k) for k, v in step.items() if k[0] == "auto"), default=(None, None))[1]
    ref = step.get(("reference", "vmap"))
    mb = {(r["op"].split()[3], r["variant"]): r["max MB"] for r in rows
          if r.get("pass") == "step" and "max MB" in r}
    label = "/".join(best) if best else None
    return {"machine": machine_info, "copy_bandwidth_GBps": round(bw, 1), "rows": rows,
            "matching_step_speedup": round(ref / step[best], 2) if ref and best else None,
            "auto_step": label,
            "class_step_ms_ipc50": round(step[best] * 1e2, 2) if best else None,
            "memory_ipc1000_over_ipc50": round(mb[("1000", label)] / mb[("50", label)], 2)
            if ("1000", label) in mb and ("50", label) in mb else None}


if __name__ == "__main__":
    sys.exit(main())
