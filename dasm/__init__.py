"""dasm: dataset distillation with DASM (difficulty-aligned sequential matching) on IDC.

    import dasm
    cfg = dasm.load_config("configs/demo.yaml", ["synthetic.ipc=10"])
    sset = dasm.distill(cfg, "runs/demo")           # run directory with synthetic.safetensors
    print(dasm.evaluate("runs/demo")["mean"])       # last-epoch test accuracy
"""
from .version import __version__

from .api import evaluate, export, info, relabel, score  # noqa: E402
from .baselines import run_baseline  # noqa: E402
from .config import Config, load_config  # noqa: E402
from .data import Dataset, load_dataset  # noqa: E402
from .errors import DasmError  # noqa: E402
from .schedule import distill  # noqa: E402
from .synthetic import SyntheticSet  # noqa: E402

__all__ = ["Config", "DasmError", "Dataset", "SyntheticSet", "distill", "evaluate",
           "export", "info", "load_config", "load_dataset", "relabel", "run_baseline", "score",
           "__version__"]
