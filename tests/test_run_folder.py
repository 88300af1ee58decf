"""A run folder is never corrupted or lost: one owner (lock), no silent overwrite, --resume checks the config and
does nothing on a finished run, files get the user's umask; the CLI's intermixed options; CSV cells escaped."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dcal import checkpoint
from dcal.checkpoint import FILE_MODE, load_training_state
from dcal.cli import build_parser, main
from dcal.config import load_config
from dcal.engine import fit
from dcal.inference import Prediction, csv_text, predictions_csv
from dcal.loading import load_model
from dcal.retrieval import save_ranking_pictures
from dcal.run_folder import (
    LOCK,
    RESUMABLE_KEYS,
    RunLock,
    RunLockedError,
    discard_unsaved_start,
    run_content,
)
from tests.helpers import REPO, SYNTHETIC_RUN

ONE_EPOCH = [*SYNTHETIC_RUN, "train.epochs=1", "train.save_every_steps=0"]


def train(out: Path, *extra: str) -> int:
    recipe = out.parent / "recipe.yaml"
    recipe.write_text("{}  # all keys are given on the command line\n")
    return main(["train", "--config", str(recipe), f"output_dir={out}", *ONE_EPOCH, *extra])


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-epoch run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train(out) == 0
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_a_second_trainer_is_refused_while_the_first_holds_the_folder(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out):
        owner = json.loads((out / LOCK).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] and owner["since"]
        with pytest.raises(RunLockedError):
            RunLock(out).acquire()
        assert train(out) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert str(out) in err and f"PID {os.getpid()}" in err and "in use" in err
        assert [p.name for p in out.iterdir()] == [LOCK]  # the refused trainer wrote nothing
    assert not (out / LOCK).exists()  # released (and removed) on exit
    assert train(out) == 0
    assert not (out / LOCK).exists() and (out / "last.pth").is_file()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    holder = ("import sys, time\nfrom dcal.run_folder import RunLock\nRunLock(sys.argv[1]).acquire()\n"
              "print('held', flush=True)\ntime.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"PID {proc.pid} on host"):
            RunLock(out).check()
    finally:
        proc.kill()
        proc.wait()
    assert json.loads((out / LOCK).read_text())["pid"] == proc.pid  # left behind by the kill
    with RunLock(out):
        err = capsys.readouterr().err
        assert "stale lock" in err and f"PID {proc.pid}" in err and len(err.strip().splitlines()) == 1
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("found", ["best.pth", "best.safetensors", "last.safetensors", "metrics.jsonl",
                                   "config.yaml", "epoch0010.pth"])
def test_any_run_content_is_refused_without_resume(tmp_path, capsys, found):
    out = tmp_path / "run"
    out.mkdir()
    (out / found).write_text("x")
    assert train(out) == 2
    err = capsys.readouterr().err
    assert str(out) in err and found in err and "output_dir=" in err
    assert [p.name for p in out.iterdir()] == [found]


def test_unrelated_files_are_not_a_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("dcal ablation writes its log before the run starts\n")
    (out / "notes.txt").write_text("mine")
    assert run_content(out) == []
    assert train(out) == 0
    assert (out / "notes.txt").read_text() == "mine" and run_content(out)


def test_resume_with_a_changed_batch_size_is_refused_listing_the_key(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    config = (out / "config.yaml").read_bytes()
    assert train(out, "--resume", "train.batch_size=2", "train.epochs=2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.batch_size: 4 -> 2" in err and "train.epochs" not in err
    assert (out / "config.yaml").read_bytes() == config  # a refused resume changes nothing


def test_resume_of_a_finished_run_does_nothing_and_writes_nothing(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    # keys that may change on resume do not count: data.root, eval.*, workers, log_every
    cfg = load_config(None, [f"output_dir={out}", *ONE_EPOCH, "data.root=elsewhere", "eval.batch_size=3",
                             "train.log_every=5"])
    capsys.readouterr()
    final = fit(cfg, resume=True)
    assert final == records(out)[-1] and final["final"]
    assert "already finished (1 epochs); nothing to do" in capsys.readouterr().out
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(p.name for p in
                                                                                      finished.iterdir())
    assert "data.root" in RESUMABLE_KEYS and "eval.*" in RESUMABLE_KEYS


def test_resume_with_more_epochs_continues_with_one_final_record_per_length(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    # options after the overrides (argparse's intermixed parsing)
    assert main(["train", "--config", str(out.parent / "x.yaml"), f"output_dir={out}", *ONE_EPOCH, "--resume",
                 "train.epochs=2"]) == 2  # (no such recipe: the error is about the file, not the arguments)
    assert "x.yaml" in capsys.readouterr().err
    assert train(out, "--resume", "train.epochs=2") == 0
    rs = records(out)
    assert [(r["epoch"], bool(r.get("final"))) for r in rs] == [(1, False), (1, True), (2, False), (2, True)]
    assert load_training_state(out / "last.pth")["epoch"] == 1
    capsys.readouterr()
    assert train(out, "--resume", "train.epochs=2") == 0
    assert "already finished (2 epochs)" in capsys.readouterr().out and records(out) == rs
    assert train(out, "--resume") == 2  # train.epochs=1 < the 2 trained: refused, not a second final record
    assert "train.epochs" in capsys.readouterr().err and records(out) == rs


def test_resume_is_an_argument_not_a_config_key(finished, tmp_path, capsys):
    """One way to say resume: fit(resume=) / --resume. train.resume is refused in one line naming both; a folder
    whose config.yaml still holds the key (every run written before it was removed) is the same run."""
    from omegaconf import OmegaConf

    from dcal.config import ConfigError, default_config
    from dcal.run_folder import other_config_changes

    with pytest.raises(ConfigError, match=r"^config key 'train.resume' does not exist: resume a run with "
                                          r"fit\(cfg, resume=True\) \(dcal train --resume\)$"):
        load_config(None, ["train.resume=true"])
    assert train(tmp_path / "new", "train.resume=true") == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "new").exists()
    out = copy_run(finished, tmp_path)
    text = (out / "config.yaml").read_text()
    assert "\ntrain:\n" in text and "resume" not in text
    (out / "config.yaml").write_text(text.replace("\ntrain:\n", "\ntrain:\n  resume: false\n"))
    cfg = load_config(None, [f"output_dir={out}", *ONE_EPOCH])
    plain = OmegaConf.to_container
    assert other_config_changes(out, plain(cfg), plain(default_config())) == []  # an ablation or pretraining reuses it
    assert fit(cfg, resume=True)["final"] and "nothing to do" in capsys.readouterr().out


def test_written_files_have_the_users_umask(finished, tmp_path, monkeypatch):
    for name in ("config.yaml", "last.pth", "best.pth", "best.safetensors", "last.safetensors", "metrics.jsonl"):
        assert stat.S_IMODE((finished / name).stat().st_mode) == FILE_MODE, name
    old = os.umask(0o027)
    try:
        assert checkpoint._read_umask() == 0o027 and os.umask(0o027) == 0o027  # read, and left as it was
    finally:
        os.umask(old)
    monkeypatch.setattr(checkpoint, "FILE_MODE", 0o666 & ~0o027)  # what import computes under umask 027
    path = checkpoint.atomic_write_text(tmp_path / "f.txt", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0666 less the umask, not mkstemp's 0600


def test_options_may_follow_the_overrides():
    args = build_parser().parse_args(["train", "--config", "C", "output_dir=X", "--resume", "train.epochs=200"])
    assert args.resume and args.overrides == ["output_dir=X", "train.epochs=200"]
    args = build_parser().parse_args(["ablation", "--config", "C", "train.epochs=2", "--seeds", "1", "a.b=1"])
    assert args.seeds == 1 and args.overrides == ["train.epochs=2", "a.b=1"]


def test_ablation_refuses_an_output_dir_override(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {epochs: 1}\n")
    assert main(["ablation", "--config", str(recipe), f"output_dir={tmp_path / 'x'}"]) == 2
    assert "--output-dir" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_csv_cells_that_look_like_formulas_are_escaped():
    text = csv_text([["=1+1", "+a", "-b", "@c", "\td", "\re", "ok", -1, 2.5, ""]])
    assert text == "'=1+1,'+a,'-b,'@c,'\td,\"'\re\",ok,-1,2.5,\n"  # LF line ends, numbers left alone
    pred = Prediction(source="=HYPERLINK(\"x\")", indices=[0], classes=["@cls"], probabilities=[1.0])
    lines = predictions_csv([pred]).split("\n")
    assert lines[1].startswith("\"'=HYPERLINK(\"\"x\"\")\",,'@cls,0,1.000000") and "\r" not in lines[0]


def test_stale_ranking_pictures_are_removed(tmp_path):
    out = tmp_path / "visrank"
    out.mkdir()
    Image.new("RGB", (4, 4)).save(out / "00007_old_query.png")
    (out / "keep.txt").write_text("not a picture of ours")

    class NoIds:  # an empty feature set: no picture to draw, only the old ones to remove
        has_ids = False

        def __len__(self) -> int:
            return 0

    assert save_ranking_pictures(out, NoIds(), NoIds(), None, max_queries=0) == []  # type: ignore[arg-type]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_only_a_start_without_any_checkpoint_or_record_is_discarded(tmp_path):
    started = tmp_path / "started"  # killed during its first epoch: config, empty metrics, TensorBoard
    (started / "tensorboard").mkdir(parents=True)
    (started / "tensorboard" / "events").write_text("e")
    (started / "config.yaml").write_text("a: 1\n")
    (started / "metrics.jsonl").write_text("")
    (started / "train.log").write_text("log")
    assert discard_unsaved_start(started) == ["config.yaml", "metrics.jsonl", "tensorboard"]
    assert [p.name for p in started.iterdir()] == ["train.log"]
    for kept_name, text in (("metrics.jsonl", '{"epoch": 0}\n'), ("best.pth", "x")):
        kept = tmp_path / kept_name
        kept.mkdir()
        (kept / "config.yaml").write_text("a: 1\n")
        (kept / kept_name).write_text(text)
        assert discard_unsaved_start(kept) == [] and len(list(kept.iterdir())) == 2


def test_a_training_checkpoint_carries_its_class_names(finished, tmp_path):
    """A .pth is a model file of its own: its class names travel in it (``extra``), not only in the exports."""
    names = load_model(run=finished).classes  # best.safetensors
    assert names is not None and len(names) == 2
    state = load_training_state(finished / "last.pth")
    assert state["extra"] == {"classes": names} and "model_config" not in state
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(finished / "last.pth", alone / "last.pth")
    assert load_model(checkpoint=alone / "last.pth").classes == names
