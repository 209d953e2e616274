"""Sweeps side by side (benchmarks/accuracy.py): one worker makes a run, a second waits for it."""
import threading

from conftest import load_benchmark

accuracy = load_benchmark("accuracy")


def test_a_claimed_run_waits_for_its_maker(tmp_path):
    lock = tmp_path / "runs" / "distill-ipc10-seed0-abc.lock"
    entered = threading.Event()

    def second_worker():
        with accuracy.claimed(lock):
            entered.set()

    with accuracy.claimed(lock):  # the first worker is making the run
        t = threading.Thread(target=second_worker)
        t.start()
        assert not entered.wait(0.5), "a second worker entered a run another one holds"
    assert entered.wait(10), "the second worker did not go on once the run was done"
    t.join()


def test_a_set_made_by_other_code_is_set_aside_not_reused(tmp_path, monkeypatch):
    """A run directory is reused only where its made_by.json names a commit whose package code
    is this checkout's; any other (or none named) is moved to stale/, whole, and made again."""
    monkeypatch.setattr(accuracy, "code_unchanged_since", lambda rev: rev == "cafe123")
    root = tmp_path / "runs"

    def run(name, made_by=None):
        d = root / name
        d.mkdir(parents=True)
        (d / "synthetic.safetensors").write_bytes(b"set of " + name.encode())
        if made_by:
            accuracy.io.write_json(d / accuracy.MADE_BY, {"commit": made_by, "cpu": "x"})
        return accuracy.RunDir(d)

    current, older, unnamed = run("a", "cafe123"), run("b", "0ld0000"), run("c")
    for r in (current, older, unnamed):
        accuracy.set_aside_if_stale(r)
    assert (root / "a" / "synthetic.safetensors").exists()  # this code's: kept in place
    assert not (root / "b").exists() and not (root / "c").exists()
    assert (root / "stale" / "b.made-by-0ld0000" / "synthetic.safetensors").read_bytes() == b"set of b"
    assert (root / "stale" / "c.made-by-unrecorded" / "synthetic.safetensors").exists()
    again = run("c")  # set aside a second time: a new name, the first one kept
    accuracy.set_aside_if_stale(again)
    assert (root / "stale" / "c.made-by-unrecorded~1" / "synthetic.safetensors").exists()
    assert (root / "stale" / "c.made-by-unrecorded" / "synthetic.safetensors").exists()


def test_seeds_named_on_the_command_line_run_at_every_ipc():
    """The profile's seeds run at IPC >= 50 and only the first of them below; seeds named with
    --seeds run wherever they are asked (IPC 10 over eight seeds is a measurement, not a typo)."""
    assert accuracy.seeds_at(10, [0, 1], named=False) == [0]
    assert accuracy.seeds_at(50, [0, 1], named=False) == [0, 1]
    assert accuracy.seeds_at(10, [3, 4, 5], named=True) == [3, 4, 5]
    assert accuracy.seeds_at(1000, [3, 4, 5], named=True) == [3, 4, 5]
