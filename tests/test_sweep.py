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
