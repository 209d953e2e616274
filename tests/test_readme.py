"""Every `dasm` and `torchrun ... -m dasm` command the README shows runs, in order, with tiny
overrides (a smaller dataset, network and budget), so a README command cannot rot. A `distill`
whose IPC the README splits into segments runs as DASM here too (two segments of 1 image), and
at this kept fraction that is the large-phi plan."""
import os
import re
import shlex

import pytest

from dasm import SyntheticSet
from dasm.cli import main
from dasm.plan import segment_sizes

from conftest import ROOT, SMOKE

TINY = ["--set", "data.train_per_class=20", "--set", "data.test_limit=50", "--set",
        "model.width=4", "--set", "match.iterations=1", "--set", "match.inner_steps=1",
        "--set", "match.n_data=8", "--set", "match.batch_real=4", "--set", "match.batch_syn=4",
        "--set", "synthetic.ipc=2", "--set", "dasm.scorer_epochs=1", "--set", "eval.epochs=1",
        "--set", "eval.repeats=1", "--no-progress"]


def readme_commands() -> list[list[str]]:
    text = open(os.path.join(ROOT, "README.md")).read()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if "$" in line or "..." in line or "[" in line:
                continue  # a template, not a command
            words = shlex.split(line)
            if words[:1] == ["torchrun"] and "-m" in words:
                words = ["dasm"] + words[words.index("-m") + 2:]
            if words[:1] == ["dasm"]:
                cmds.append(words[1:])
    return cmds


def tiny(argv: list[str], tmp) -> list[str]:
    argv = [a.replace("runs/", f"{tmp}/runs/").replace("out/", f"{tmp}/out/")
            if not a.startswith("configs/") else os.path.join(ROOT, a) for a in argv]
    if argv[0] in ("distill", "baseline", "score"):
        if "--config" not in argv:
            argv += ["--config", SMOKE]
        argv += TINY
    if argv[0] == "distill" and "--ipc" in argv:
        if len(segment_sizes(int(argv[argv.index("--ipc") + 1]), "auto")) == 2:
            argv += ["--set", "dasm.segments=2"]  # the README's DASM, in two segments of 1
    if argv[0] == "evaluate":
        argv += ["--epochs", "1", "--repeats", "1"]
    return argv


def test_readme_shows_commands():
    assert {c[0] for c in readme_commands()} >= {"distill", "evaluate", "baseline", "export",
                                                 "info", "score"}


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    dasm_runs = 0
    for argv in readme_commands():
        small = tiny(argv, tmp_path)
        assert main(small) == 0, " ".join(argv)
        if "dasm.segments=2" in small:
            out = small[small.index("--out") + 1]
            assert SyntheticSet.load(f"{out}/synthetic.safetensors").segment_sizes == [1, 1]
            dasm_runs += 1
    assert dasm_runs >= 3  # the "2 segments of 10" line, the profile line and its --resume
