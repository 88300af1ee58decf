"""Lose at most a few steps: SIGKILL or SIGTERM mid-epoch, --resume, same result; atomic checkpoint writes.

The training process is a real ``python -m dcal train`` subprocess killed with SIGKILL (or stopped with SIGTERM,
SIGINT) by this test. The test hook ``DCAL_TEST_STEP_DELAY_S`` (dcal.engine.run.STEP_DELAY_ENV) only slows each
step so that the signal lands after the first mid-epoch checkpoint and before the next one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcal.checkpoint import load_training_state, remove_stale_temporaries
from dcal.engine.run import STEP_DELAY_ENV, TIME_KEYS
from tests.helpers import REPO, SYNTHETIC_RUN

TOL = dict(rtol=0.0, atol=0.0)  # bit-exact: same ops, same order, same RNG streams, one thread


def dcal_train(out: Path, *extra: str, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), STEP_DELAY_ENV: str(delay)}
    recipe = out.parent / "recipe.yaml"
    recipe.write_text("{}  # all keys are given on the command line\n")
    cmd = [sys.executable, "-m", "dcal", "train", "--config", str(recipe), f"output_dir={out}", *SYNTHETIC_RUN, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, "the run ended before the expected checkpoint"
        assert time.monotonic() < end, "timed out waiting for a mid-epoch checkpoint"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted ones must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    finish(dcal_train(out))
    return out


def assert_same_run(a_dir: Path, b_dir: Path) -> None:
    """Bit-identical weights, the same metrics records (times aside)."""
    a, b = load_file(a_dir / "last.safetensors"), load_file(b_dir / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], **TOL, msg=k)
    ra, rb = records(a_dir), records(b_dir)
    assert [(r["epoch"], r.get("step")) for r in rb] == [(r["epoch"], r.get("step")) for r in ra]
    assert [(1, 2), (1, 4), (1, None), (2, 2), (2, 4), (2, None), (2, None)] == [(r["epoch"], r.get("step"))
                                                                                   for r in ra]
    for x, y in zip(ra, rb, strict=True):
        assert {k: v for k, v in y.items() if k not in TIME_KEYS} == {k: v for k, v in x.items() if k not in TIME_KEYS}


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(straight, tmp_path):
    killed = tmp_path / "killed"
    proc = dcal_train(killed, delay=1.0)
    metrics = killed / "metrics.jsonl"
    # the first mid-epoch checkpoint (epoch 1, step 2) is on disk once its metrics line is
    wait_for(lambda: metrics.exists() and '"step": 2,' in metrics.read_text(), proc)
    time.sleep(0.5)  # inside the 1 s of step 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_training_state(killed / "last.pth")
    assert (state["epoch"], state["progress_per_rank"][0]["batches"]) == (0, 2)
    before = records(killed)
    assert [r.get("step") for r in before] == [2]

    resumed = finish(dcal_train(killed, "--resume"))  # the killed run's lock is stale: taken over
    assert "resuming" in resumed and "batch 3 of epoch 1/2" in resumed
    assert "eta" in resumed  # progress lines off a terminal: epoch, step, img/s, ETA
    assert_same_run(straight, killed)


def test_sigterm_mid_epoch_saves_there_and_resume_equals_uninterrupted(straight, tmp_path):
    stopped = tmp_path / "stopped"
    proc = dcal_train(stopped, delay=1.0)
    metrics = stopped / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and '"step": 2,' in metrics.read_text(), proc)
    time.sleep(0.5)  # inside the 1 s of step 3: the run finishes that step, saves and stops
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert out.strip().splitlines()[-1] == (f"dcal train: interrupted by SIGTERM at epoch 1 step 3; saved "
                                            f"{stopped / 'last.pth'}: resume with --resume")
    state = load_training_state(stopped / "last.pth")
    assert (state["epoch"], state["progress_per_rank"][0]["batches"]) == (0, 3)
    assert [r.get("step") for r in records(stopped)] == [2]  # no metrics line for the stop itself
    assert not (stopped / ".dcal.lock").exists()  # released on the way out

    resumed = finish(dcal_train(stopped, "--resume"))
    assert "batch 4 of epoch 1/2" in resumed
    assert_same_run(straight, stopped)


def test_a_second_sigint_stops_at_once_and_claims_no_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = dcal_train(out, delay=1.0)
    for line in proc.stdout:  # the first step's progress line, printed before its 1 s pause
        if "step 1/6" in line:
            break
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, rest[-3000:]
    assert rest.strip().splitlines()[-1] == ("dcal train: interrupted by SIGINT at once, without saving; no "
                                             "checkpoint was written")
    assert not (out / "last.pth").exists()


SAVER = """
import sys, torch
from dcal.checkpoint import save_training_state
i = 0
while True:
    save_training_state(sys.argv[1], model={"w": torch.full((1_000_000,), float(i))}, config=str(i))
    print(i, flush=True)
    i += 1
"""


@pytest.mark.parametrize("after_s", [0.15])
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path, after_s):
    path = tmp_path / "last.pth"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "0"  # one complete save, then saves in a loop
    time.sleep(after_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_training_state(path)
    assert torch.all(state["model"]["w"] == float(state["config"]))  # one whole save, never a mix or a cut
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]
