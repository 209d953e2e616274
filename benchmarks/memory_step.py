"""Peak memory of one matching step of the last DASM segment, in a fresh process.

    python benchmarks/memory_step.py --ipc 1000 [--segment 50] [--mode chunked|graph]

chunked: dasm's engine (frozen segments' gradients without graphs, in chunks);
graph:   IDC's loop with the frozen images joining the synthetic batch (and its graph).
Every frozen image takes part (match.frozen_per_class=0). Prints one JSON line.
"""
import argparse
import json
import resource
import sys
import time

import torch

from dasm import runtime
from dasm.config import load_config
from dasm.rules import resolve
from dasm.data import load_dataset
from dasm.matching import Matcher


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ipc", type=int, required=True)
    p.add_argument("--segment", type=int, default=50)
    p.add_argument("--mode", choices=("chunked", "graph"), default="chunked")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--limit-gb", type=float, default=0, help="cap the heap (RLIMIT_DATA)")
    a = p.parse_args()
    runtime.tune_cpu_allocator()
    ds = load_dataset("fashion-mnist")
    cfg = load_config(None, [f"synthetic.ipc={a.ipc}", f"dasm.segments={a.ipc // a.segment}",
                             f"model.width={a.width}", "match.frozen_per_class=0",
                             "match.frozen_chunk=256", "match.class_chunk=1",
                             f"match.engine={'batched' if a.mode == 'chunked' else 'loop'}"])
    cfg = resolve(cfg, ds.name, ds.image_size, cuda=False)
    g = torch.Generator().manual_seed(0)
    m = Matcher(cfg, ds, torch.device("cpu"), g)
    model = m.new_network()
    C, n, nf = ds.num_classes, a.segment, a.ipc - a.segment
    images = torch.rand(C, n, 1, 28, 28, generator=g)
    frozen = torch.rand(C, nf, 1, 28, 28, generator=g) if nf else None
    draws = m.draw(ds.class_index(), n, nf)
    before = current_rss_mb()
    if a.limit_gb:
        limit = int(a.limit_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    t0 = time.perf_counter()
    out = {"ipc": a.ipc, "segment": a.segment, "mode": a.mode, "width": a.width,
           "frozen_decoded_per_class": 0 if frozen is None else nf * 4,
           "rss_before_step_mb": round(before, 1)}
    try:
        m.step(model, draws, images, torch.zeros_like(images), frozen)
        out.update(peak_rss_mb=round(rss_mb(), 1), seconds=round(time.perf_counter() - t0, 2))
    except (RuntimeError, MemoryError) as e:
        out.update(peak_rss_mb=None, error=f"out of memory under a {a.limit_gb} GB heap cap: "
                                           f"{str(e).splitlines()[0][:120]}")
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
