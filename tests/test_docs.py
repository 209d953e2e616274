"""The README's key table against the config schema, and the project's own docs."""
import dataclasses
import pathlib
import re

from dasm.config import Config
from conftest import load_benchmark

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def schema_defaults() -> dict[str, object]:
    """Dotted key -> default of every schema field."""
    out = {}

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, prefix + f.name + ".")
            else:
                out[prefix + f.name] = v
    walk(Config(), "")
    return out


def shown(value) -> str:
    """A default as the README writes it: true/false, 1 for 1.0, lists as [a, b]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def key_table() -> list[tuple[list[str], list[str]]]:
    """``(keys, defaults)`` of every row of the README's key table."""
    start = README.index("| key | default | meaning |")
    rows = []
    for line in README[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        keys, default = [c.strip() for c in line.strip("|").split("|")][:2]
        keys = re.findall(r"`([a-z_.]+)`", keys.split("(")[0])
        # a remark in parentheses after a value (e.g. "auto (2)") is not part of it
        defaults = [re.sub(r"\s*\(.*?\)", "", d).strip() for d in default.split(", ")]
        rows.append((keys, defaults))
    return rows


def test_readme_key_table_matches_the_schema():
    schema = schema_defaults()
    rows = key_table()
    assert len(rows) >= 10
    for keys, defaults in rows:
        assert len(keys) == len(defaults), f"row {keys}: {len(defaults)} defaults for the keys"
        for key, default in zip(keys, defaults):
            assert key in schema, f"README names config key {key!r} that the schema lacks"
            assert default == shown(schema[key]), \
                f"README gives {key} = {default!r}, the schema's default is {shown(schema[key])!r}"
    # every DASM key is documented
    documented = {k for keys, _ in rows for k in keys}
    missing = sorted(k for k in schema if k.startswith("dasm.") and k not in documented)
    assert not missing, f"dasm keys missing from the README's table: {missing}"


def test_the_clone_carries_its_own_docs():
    """A user's clone has no ../shared: the project cites only what it carries."""
    for doc in ("docs/method.md", "docs/protocol.md"):
        assert (ROOT / doc).is_file()
    cited = []
    for p in [ROOT / "README.md", *ROOT.glob("dasm/*.py"), *ROOT.glob("benchmarks/*"),
              *ROOT.glob("configs/**/*.yaml"), *ROOT.glob("tests/*.py")]:
        if p.name != "test_docs.py" and re.search(r"\b(DESIGN|PROTOCOL)\.md", p.read_text()):
            cited.append(p.name)
    assert not cited, f"files cite documents a clone lacks: {cited}"


def test_readme_accuracy_tables_are_the_results_files():
    """Every accuracy table the README shows between its markers is the one the results file
    gives now, less its wall times (``accuracy.py --report`` writes both), and so is the .md
    beside the file: a figure edited by hand, or a record added without the report, fails."""
    _records, _report = load_benchmark("_records"), load_benchmark("_report")

    blocks = 0
    for path in sorted((ROOT / "results").glob("accuracy-*.json")):
        name = path.stem.removeprefix("accuracy-")
        md = _report.markdown(*_records.contents(path))
        assert (ROOT / "results" / f"accuracy-{name}.md").read_text() == md, name
        begin, end = _report.readme_block(name)
        if begin in README:
            blocks += 1
            shown = README.split(begin, 1)[1].split(end, 1)[0]
            assert shown == f"\n{_report.readme_part(md)}", name
            assert "Wall time" in md and "Wall time" not in _report.readme_part(md), name
    assert blocks >= 1, "the README shows no accuracy table from results/"


def test_a_report_names_the_code_behind_its_records():
    """A table that mixes commits says which record is whose; records without a commit (made
    before records named one) are named as such, not passed off as this code's."""
    _report = load_benchmark("_report")

    def rec(method, ipc, seed, commit=None, cpu=None):
        return {"method": method, "ipc": ipc, "seed": seed, "accuracies": [0.8], "mean": 0.8,
                "std": 0.0, **({"commit": commit} if commit else {}),
                **({"cpu": cpu} if cpu else {})}

    records = [rec("random", 100, 0), rec("dasm", 100, 0, "abcdef0123"),
               rec("dasm", 1000, 0, "abcdef0123"), rec("idc", 1000, 0, "1234567aaa"),
               rec("idc-f1", 1000, 0, "abcdef0123", "CPU B"), rec("dasm", 200, 1, None, "CPU B")]
    md = _report.markdown(records, [100, 200, 1000], ["random", "idc", "idc-f1", "dasm"], "test")
    line = next(s for s in md.splitlines() if s.startswith("Code behind the records"))
    assert "1234567: idc (1000)" in line and "abcdef0: dasm (100, 1000)" in line
    assert "abcdef0 on CPU B: idc-f1 (1000)" in line  # same commit, another machine: apart
    assert line.index("1234567") < line.index("abcdef0") < line.index("no commit recorded")
    assert line.split("no commit recorded", 1)[1].endswith(": random (100), dasm (200).")


def test_a_report_spread_is_the_sample_std():
    """The ± of a table is the sample std (n - 1), as the seed intervals use, worked by hand:
    dasm - random per seed +1 and +3 gives +2.00 ± 1.41 (a population std would say 1.00); one
    value has no spread to show."""
    _report = load_benchmark("_report")

    def rec(method, seed, accs):
        return {"method": method, "ipc": 100, "seed": seed, "accuracies": accs,
                "mean": sum(accs) / len(accs), "std": 0.0}

    records = [rec("random", 0, [0.80]), rec("dasm", 0, [0.81]),
               rec("random", 1, [0.80]), rec("dasm", 1, [0.83])]
    md = _report.markdown(records, [100], ["random", "dasm"], "test")
    assert "| 82.00 ± 1.41 (2×1) |" in md  # dasm: 81 and 83
    assert "| 80.00 ± 0.00 (2×1) |" in md
    assert "| +2.00 ± 1.41 (n=2) |" in md  # dasm − best baseline
    one = _report.markdown(records[:2], [100], ["random", "dasm"], "test")
    assert "| 81.00 (1×1)" in one and "| +1.00 (n=1)" in one


def test_seed_pairs_pairs_per_seed_and_reads_the_interval():
    """Differences pair one seed's records (the best baseline chosen per seed, missing seeds
    skipped); the interval is the t interval of the sample (n - 1) std, worked by hand here."""
    seed_pairs = load_benchmark("seed_pairs")

    def rec(method, seed, mean):
        return {"method": method, "ipc": 1000, "seed": seed, "mean": mean}

    records = [rec("dasm", 0, 0.900), rec("random", 0, 0.890), rec("idc-f1", 0, 0.895),
               rec("dasm", 1, 0.890), rec("random", 1, 0.892), rec("idc-f1", 1, 0.880),
               rec("dasm", 2, 0.901), rec("random", 2, 0.895),
               rec("dasm", 3, 0.950)]  # seed 3: no baseline, not paired
    rows = seed_pairs.rows(records, 1000, None, [("dasm", "best")], ["random", "idc-f1"], 0.5)
    (row,) = rows
    assert row["n"] == 3 and row["per seed"] == "+0.50, -0.20, +0.60"
    # mean 0.3, sample std sqrt(((0.2)^2 + (0.5)^2 + (0.3)^2) / 2) = sqrt(0.19) = 0.4359;
    # t(0.975, 2) = 4.3027: half width 4.3027 * 0.4359 / sqrt(3) = 1.0828
    assert row["mean"] == "+0.30" and row["std"] == "0.44"
    assert row["95 % interval"] == "[-0.78, +1.38]"
    assert row["reading"] == "undecided (contains 0 and +0.5)"
    only = seed_pairs.rows(records, 1000, [0, 2], [("dasm", "random")], ["random"], 0.5)[0]
    assert only["per seed"] == "+1.00, +0.60"
    assert seed_pairs.reading(0.6, 0.9, 0.5) == "above +0.5"
    assert seed_pairs.reading(0.1, 0.4, 0.5) == "above 0, under +0.5"
    assert seed_pairs.reading(-0.1, 0.4, 0.5) == "level (contains 0)"
    assert seed_pairs.reading(-0.9, -0.1, 0.5) == "below 0"


def test_seed_pairs_outcome_replaces_only_its_own_rows():
    seed_pairs = load_benchmark("seed_pairs")
    row = lambda ipc, pair, mean: {"IPC": ipc, "pair": pair, "mean": mean}  # noqa: E731
    old = {"rows": [row(1000, "dasm - best", "+0.10"), row(50, "dasm - idc", "-0.20")],
           "commands": ["python a"]}
    got = seed_pairs.outcome(old, [row(1000, "dasm - best", "+0.30")], "python b")
    assert got["rows"] == [row(1000, "dasm - best", "+0.30"), row(50, "dasm - idc", "-0.20")]
    assert got["commands"] == ["python a", "python b"] and "commit" in got
