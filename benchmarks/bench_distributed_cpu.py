"""1 process vs 2 processes (torchrun, gloo) on this machine: wall time of one DASM distillation.

    python benchmarks/bench_distributed_cpu.py      -> results/distributed-cpu.json

On a 2-core machine both runs have the same two cores (1 process x 2 threads, or 2 processes x
1 thread), so this measures the overhead of sharding and all-reduce, not a speed-up: a real
speed-up needs more devices or cores than one process can use.
"""
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import ROOT, table, update_results  # noqa: E402

ARGS = ["--config", str(ROOT / "configs/demo.yaml"), "--set", "synthetic.ipc=20", "--set",
        "dasm.segments=2", "--set", "match.iterations=4", "--set", "dasm.scorer_epochs=20",
        "--no-progress"]


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc, out):
    base = ["-m", "dasm", "distill", "--out", out, *ARGS]
    env = dict(os.environ)
    if nproc == 1:
        cmd = [sys.executable, *base]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={port()}", *base]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // nproc))
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return time.perf_counter() - t


def main():
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, 2):
            sec = run(nproc, os.path.join(tmp, f"p{nproc}"))
            rows.append({"processes": nproc, "wall_s": round(sec, 1)})
    rows[1]["speed-up"] = f"{rows[0]['wall_s'] / rows[1]['wall_s']:.2f}x"
    print(table(rows, ["processes", "wall_s", "speed-up"]))
    update_results("distributed-cpu.json", "demo-ipc20-2segments",
                   {"args": ARGS, "rows": rows, "cores": os.cpu_count()})


if __name__ == "__main__":
    main()
