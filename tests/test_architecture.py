"""The house rules of the architecture (README) that code can check: data flows one way (every
import of a ``dasm`` module goes to a strictly lower floor, so there is no circle), and modules
stay small."""
import ast
import pathlib
import re

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "dasm"
FLOORS = [  # top to bottom
    {"__main__"},
    {"cli"},
    {"__init__"},
    {"api", "baselines"},
    {"schedule"},
    {"rundir"},
    {"matching"},
    {"loop_engine", "window", "teacher", "chunking", "draws", "step_graph"},
    {"train", "scoring", "synthetic"},
    {"models", "runtime", "rules"},
    {"config", "ops"},
    {"dispatch"},
    {"reference", "validation"},
    {"data", "dsa", "plan", "formation", "_ext", "distributed", "image_optim",
     "fused_block", "coerce", "convnet_depth"},
    {"loaders"},
    {"errors", "io", "rng", "version", "autotable"},
]
FLOOR = {m: i for i, floor in enumerate(FLOORS) for m in floor}


def dasm_imports(path: pathlib.Path) -> set[str]:
    """Modules of ``dasm`` that ``path`` imports, at the top or inside functions."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 1:
            deps.update([node.module.split(".")[0]] if node.module else
                        [a.name for a in node.names])
        elif node.level == 0 and node.module and node.module.split(".")[0] == "dasm":
            parts = node.module.split(".")
            deps.add(parts[1] if len(parts) > 1 else "__init__")
    return deps - {"kernels", "_C"}


MODULES = sorted(p.stem for p in PKG.glob("*.py"))


def test_every_module_has_a_floor():
    assert set(MODULES) == set(FLOOR), set(MODULES) ^ set(FLOOR)


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_down(module):
    upward = [d for d in dasm_imports(PKG / f"{module}.py") if FLOOR[d] <= FLOOR[module]]
    assert not upward, f"dasm.{module} (floor {FLOOR[module]}) imports {upward} from its own floor or above"


def test_modules_stay_small():
    big = {p.name: n for p in PKG.glob("*.py") if (n := len(p.read_text().splitlines())) > 420}
    assert not big, big


def test_readme_table_agrees_with_the_floors():
    """The README's architecture table names every module once, and never puts a module on a
    lower floor than one it may import (it may merge adjacent floors of this file)."""
    readme = (PKG.parent / "README.md").read_text()
    table = {m: int(floor) for floor, mods in
             re.findall(r"^\| (\d+) \| (`[^|]+`) \|", readme, flags=re.MULTILINE)
             for m in re.findall(r"`(\w+)`", mods)}
    assert set(table) == set(MODULES) - {"__main__"}, set(table) ^ (set(MODULES) - {"__main__"})
    wrong = [(a, b) for a in table for b in table
             if FLOOR[a] < FLOOR[b] and table[a] > table[b]
             or FLOOR[a] == FLOOR[b] and table[a] != table[b]]
    assert not wrong, f"README floors disagree with tests/test_architecture.py's: {wrong[:3]}"
