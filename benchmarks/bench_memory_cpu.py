"""Peak memory of the last segment's matching step as IPC grows (docs/protocol.md): IPC 50, 200,
500, 1000 in segments of 50, every frozen image in play, each in a fresh process.

    python -m pytest benchmarks/bench_memory_cpu.py -s     -> results/matching-cpu.json["memory"]

The goal is a flat line for dasm's engine (frozen gradients without graphs, chunked); the same
step with the frozen images in the graph (IDC's loop) is shown beside it, under a heap cap.
"""
import json
import os
import subprocess
import sys

from _common import table, update_results

IPCS = [int(x) for x in os.environ.get("DASM_BENCH_IPCS", "50,200,500,1000").split(",")]
GRAPH_LIMIT_GB = float(os.environ.get("DASM_BENCH_GRAPH_LIMIT_GB", "16"))
HERE = os.path.dirname(os.path.abspath(__file__))


def run(ipc, mode):
    cmd = [sys.executable, os.path.join(HERE, "memory_step.py"), "--ipc", str(ipc), "--mode", mode]
    if mode == "graph":
        cmd += ["--limit-gb", str(GRAPH_LIMIT_GB)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        return {"ipc": ipc, "mode": mode, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_memory_flat():
    rows = [run(ipc, mode) for mode in ("chunked", "graph") for ipc in IPCS]
    base = next(r["peak_rss_mb"] for r in rows if r["mode"] == "chunked" and r["ipc"] == IPCS[0])
    for r in rows:
        if r.get("peak_rss_mb"):
            r["vs chunked IPC %d" % IPCS[0]] = f"{r['peak_rss_mb'] / base:.2f}x"
    print("\npeak RSS of one matching step of the last segment (segments of 50, width 128)")
    print(table(rows, ["mode", "ipc", "frozen_decoded_per_class", "rss_before_step_mb",
                       "peak_rss_mb", "seconds", "vs chunked IPC %d" % IPCS[0], "error"]))
    path = update_results("matching-cpu.json", "memory", {"rows": rows,
                                                          "graph_heap_cap_gb": GRAPH_LIMIT_GB})
    print(f"-> {path}")
    top = next(r for r in rows if r["mode"] == "chunked" and r["ipc"] == IPCS[-1])
    assert top["peak_rss_mb"] <= 1.3 * base, "peak memory grows with IPC"
