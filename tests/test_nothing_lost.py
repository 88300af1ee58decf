"""Nothing lost (issue 25): dcal deletes or replaces only what it wrote, locks a folder before it reads or repairs
it, continues every interruption with the command it printed, checks the whole job before the first stage
trains, and writes only finite numbers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcal.cli import main
from dcal.run_folder import LOCK, MADE_BY, RunLock, claim_folder, read_made_by, remove_run_folder
from tests.helpers import SHARED_DATA, SYNTHETIC_RUN, TINY_TIMM_KWARGS, needs_shared, tiny_model

TINY_DEMO = ["train.epochs=1", "data.synthetic_train_per_class=10", "data.synthetic_test_per_class=4",
             "data.synthetic_image_size=32", "data.resize=36", "model.img_size=32", TINY_TIMM_KWARGS,
             "model.pwca_blocks=2"]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file, folder and link under ``root`` with its bytes' hash (links: their target, never followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def user_folder_named_like_the_demo(root: Path) -> None:
    """A user's own folders and files with the demo's names: a git checkout in dcal/, a thesis in pretrain/,
    notes in sa_only/, a picture and a summary of their own, and a link to a folder elsewhere."""
    (root / "dcal").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(root / "dcal")], check=True)
    (root / "dcal" / "model.py").write_text("print('my code')\n")
    (root / "pretrain").mkdir()
    (root / "pretrain" / "thesis.tex").write_text("\\chapter{Results}\n")
    (root / "sa_only").mkdir()
    (root / "sa_only" / "config.yaml").write_text("my: own config\n")
    (root / "rollout.png").write_bytes(b"\x89PNG\r\n\x1a\n not dcal's")
    (root / "summary.json").write_text('{"mine": true}')


@pytest.mark.parametrize("fresh", [False, True])
def test_the_demo_never_touches_a_users_folders_named_like_its_own(tmp_path, capsys, fresh):
    out = tmp_path / "work"
    user_folder_named_like_the_demo(out)
    before = tree_digest(out)
    assert main(["demo", "--output-dir", str(out), *(["--fresh"] if fresh else []), *TINY_DEMO]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dcal did not make it" in err and str(out / "pretrain") in err
    assert "--fresh" not in err  # the way out is never the flag that would delete
    assert tree_digest(out) == before


@pytest.mark.parametrize("name", ["pretrain", "sa_only", "dcal", "summary.json", "rollout.png"])
def test_each_demo_name_alone_is_refused_when_not_the_demos(tmp_path, capsys, name):
    out = tmp_path / "work"
    out.mkdir()
    if name.endswith((".json", ".png")):
        (out / name).write_text("mine")
    else:
        (out / name).mkdir()
        (out / name / "mine.txt").write_text("mine")
    before = tree_digest(out)
    assert main(["demo", "--output-dir", str(out), "--fresh", *TINY_DEMO]) == 2
    assert str(out / name) in capsys.readouterr().err
    assert tree_digest(out) == before


def test_links_are_never_followed_into_a_deletion(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    claim_folder(elsewhere, "dcal demo", "sa_only")  # even a folder marked as the demo's, reached through a link
    (elsewhere / "metrics.jsonl").write_text("{}\n")
    out = tmp_path / "work"
    out.mkdir()
    (out / "sa_only").symlink_to(elsewhere, target_is_directory=True)
    before = tree_digest(tmp_path)
    assert main(["demo", "--output-dir", str(out), "--fresh", *TINY_DEMO]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert tree_digest(tmp_path) == before
    with pytest.raises(FileExistsError, match="symbolic link"):
        remove_run_folder(out / "sa_only", "dcal demo", "sa_only")


def test_output_dirs_that_are_files_system_or_home_folders_are_refused(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for target, words in ((a_file, "is a file"), (tmp_path / "home", "home folder"), (Path("/"), "system folder"),
                          (Path("/usr"), "system folder")):
        assert main(["demo", "--output-dir", str(target), *TINY_DEMO]) == 2
        assert words in capsys.readouterr().err
        assert main(["ablation", "--config", "configs/demo.yaml", "--output-dir", str(target)]) == 2
        assert words in capsys.readouterr().err
    assert a_file.read_text() == "x" and list((tmp_path / "home").iterdir()) == []


def test_the_demo_runs_fresh_keeps_a_users_file_in_its_own_folder_and_refuses_another_demos_runs(tmp_path,
                                                                                                  capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), *TINY_DEMO]) == 0
    assert read_made_by(out / "dcal")["made_by"] == "dcal demo"
    (out / "dcal" / "my_notes.txt").write_text("keep me")
    assert main(["demo", "--output-dir", str(out), "--fresh", *TINY_DEMO]) == 0
    assert (out / "dcal" / "my_notes.txt").read_text() == "keep me"
    assert (out / "dcal" / "last.safetensors").is_file()  # trained again beside it
    # a folder another dcal command made is not the demo's to replace
    (out / "sa_only" / MADE_BY).write_text(json.dumps({"made_by": "dcal ablation", "role": "run"}))
    capsys.readouterr()
    assert main(["demo", "--output-dir", str(out), "--fresh", *TINY_DEMO]) == 2
    assert "made by 'dcal ablation'" in capsys.readouterr().err


def _hold_lock(folder: Path) -> subprocess.Popen:
    holder = ("import sys, time\nfrom dcal.run_folder import RunLock\nRunLock(sys.argv[1]).acquire()\n"
              "print('held', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_ablation_on_a_busy_run_folder_changes_nothing(tmp_path, capsys):
    out = tmp_path / "abl"
    run = out / "sa_only" / "seed0"
    claim_folder(run, "dcal ablation", "run")
    (run / "config.yaml").write_text("being written by the first ablation\n")
    (run / "metrics.jsonl").write_text("")
    proc = _hold_lock(run)
    try:
        before = tree_digest(out)
        assert main(["ablation", "--config", "configs/demo.yaml", "--set", "table3", "--seeds", "1",
                     "--output-dir", str(out), *SYNTHETIC_RUN, "model.pretrain=null"]) == 2
        assert "in use by another dcal run" in capsys.readouterr().err
        assert tree_digest(out) == before
    finally:
        proc.kill()
        proc.wait()


def test_a_demo_beside_a_training_in_its_folder_changes_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    claim_folder(out / "sa_only", "dcal demo", "sa_only")
    proc = _hold_lock(out / "sa_only")
    try:
        before = tree_digest(out)
        assert main(["demo", "--output-dir", str(out), "--fresh", *TINY_DEMO]) == 2
        assert "in use by another dcal run" in capsys.readouterr().err
        assert tree_digest(out) == before
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_is_lent_only_inside_its_block_and_only_to_this_thread(tmp_path):
    import threading

    from dcal.run_folder import RunLockedError

    lock = RunLock(tmp_path / "r")
    with lock:
        with pytest.raises(RunLockedError):
            RunLock(tmp_path / "r").acquire()  # held, not lent
        with lock.lend():
            with RunLock(tmp_path / "r"):  # lent: nests
                pass
            assert (tmp_path / "r" / LOCK).exists()  # the inner release leaves the outer lock
            errors = []
            t = threading.Thread(target=lambda: errors.append(_try(RunLock(tmp_path / "r").acquire)))
            t.start()
            t.join()
            assert isinstance(errors[0], RunLockedError)
    assert not (tmp_path / "r" / LOCK).exists()


def _try(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


def _pretrain_recipes(tmp_path: Path, depth: int = 2) -> tuple[Path, Path]:
    import yaml

    common = {"data": {"dataset": "synthetic", "root": "unused", "synthetic_train_per_class": 6,
                       "synthetic_test_per_class": 3, "synthetic_image_size": 32, "resize": 36,
                       "synthetic_num_classes": 4},
              "model": {"backbone": "deit_tiny_patch16_224", "img_size": 32,
                        "timm_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3, "patch_size": 8},
                        "pwca_blocks": 2},
              "train": {"epochs": 2, "batch_size": 8, "workers": 0, "log_every": 1, "deterministic": True,
                        "save_every_steps": 1}}
    pre = tmp_path / "pre.yaml"
    pre.write_text(yaml.safe_dump({**common, "data": {**common["data"], "synthetic_task": "coarse"}}))
    fine_model = {**common["model"], "pretrain": str(pre),
                  "timm_kwargs": {**common["model"]["timm_kwargs"], "depth": depth}}
    fine = tmp_path / "fine.yaml"
    fine.write_text(yaml.safe_dump({**common, "model": fine_model}))
    return pre, fine


def test_a_finetuning_that_cannot_run_is_refused_before_the_pretraining_trains(tmp_path, capsys):
    _, fine = _pretrain_recipes(tmp_path)
    taken = tmp_path / "runs" / "taken"
    taken.mkdir(parents=True)
    (taken / "last.pth").write_bytes(b"x")
    (taken / "config.yaml").write_text("x: 1\n")
    assert main(["train", "--config", str(fine), f"output_dir={taken}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "pretrain").exists()  # nothing pretrained
    # another backbone on the command line than the pretraining recipe's: refused before anything trains
    assert main(["train", "--config", str(fine), f"output_dir={tmp_path / 'runs' / 'x'}",
                 "model.timm_kwargs.embed_dim=96"]) == 2
    err = capsys.readouterr().err
    assert "is not the one the pretraining recipe" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "pretrain").exists()
    # a data root that does not exist
    assert main(["train", "--config", str(fine), f"output_dir={tmp_path / 'runs' / 'y'}", "data.dataset=cub",
                 f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "pretrain").exists()


def test_the_ablation_checks_every_stage_before_it_pretrains(tmp_path, capsys):
    _, fine = _pretrain_recipes(tmp_path)
    out = tmp_path / "abl"
    assert main(["ablation", "--config", str(fine), "--set", "table3", "--seeds", "1", "--output-dir", str(out),
                 "model.timm_kwargs.embed_dim=96"]) == 2
    assert "is not the one the pretraining recipe" in capsys.readouterr().err
    assert not (tmp_path / "pretrain").exists()


def test_an_ablation_run_folder_of_another_config_is_refused_before_the_pretraining(tmp_path, capsys):
    import yaml

    _, fine = _pretrain_recipes(tmp_path)
    out = tmp_path / "abl"
    run = out / "sa_only" / "seed0"
    claim_folder(run, "dcal ablation", "run")
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 7}}))
    assert main(["ablation", "--config", str(fine), "--set", "table3", "--seeds", "1", "--output-dir", str(out)]) == 2
    assert "holds a run with another config" in capsys.readouterr().err
    assert not (tmp_path / "pretrain").exists()


def test_a_pretraining_killed_before_its_first_checkpoint_is_started_again(tmp_path, capsys):
    from dcal.pretrain import cache_folder

    pre, fine = _pretrain_recipes(tmp_path)
    out = tmp_path / "runs" / "fine"
    folder = cache_folder(pre, out.parent)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("what a killed start leaves\n")
    (folder / "metrics.jsonl").write_text("")
    assert main(["train", "--config", str(fine), f"output_dir={out}"]) == 0
    assert "stopped before its first checkpoint; starting it again" in capsys.readouterr().out
    assert (folder / "last.safetensors").is_file() and (out / "last.safetensors").is_file()


def test_resume_of_a_run_with_nothing_saved_starts_it(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("x: 1\n")
    assert main(["train", "--config", "configs/demo.yaml", "model.pretrain=null", *SYNTHETIC_RUN,
                 f"output_dir={out}"]) == 2
    assert "pass --resume to start it again" in capsys.readouterr().err
    assert main(["train", "--config", "configs/demo.yaml", "model.pretrain=null", *SYNTHETIC_RUN,
                 f"output_dir={out}", "--resume"]) == 0
    assert "stopped before its first checkpoint; starting it again (removed config.yaml)" in capsys.readouterr().out


def test_a_killed_pretraining_and_finetuning_continue_with_the_printed_command_to_the_same_result(tmp_path):
    """kill -9 at random moments of a pretraining + fine-tuning job, then the command dcal prints (--resume), until
    it finishes: the final records equal an uninterrupted run's (times aside)."""
    import random

    _, fine = _pretrain_recipes(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DCAL_TEST_STEP_DELAY_S": "0.2"}
    cmd = [sys.executable, "-m", "dcal.cli", "train", "--config", str(fine)]

    def final(folder: Path) -> dict:
        rec = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
        return {k: v for k, v in rec.items() if k not in ("train_time_s", "images_per_s")}

    ref = tmp_path / "ref" / "fine"
    subprocess.run([*cmd, f"output_dir={ref}"], env=env, check=True, capture_output=True)
    out = tmp_path / "killed" / "fine"
    checkpoints = [out.parent / "pretrain" / "pre" / "last.pth", out / "last.pth"]

    def saved() -> list[float]:
        return [p.stat().st_mtime_ns if p.exists() else 0 for p in checkpoints]

    rng = random.Random(0)
    kills = 0
    for attempt in range(6):  # five kills at random moments, then the printed command runs to the end
        args = [*cmd, f"output_dir={out}"] + (["--resume"] if attempt else [])
        before = saved()
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if attempt == 5:
            assert proc.wait(timeout=300) == 0, proc.stderr.read()
            break
        if attempt == 0:  # while it starts: before the pretraining's first checkpoint
            time.sleep(rng.uniform(0.5, 2.0))
        else:  # at a random moment after this process saved a checkpoint (mid-step, mid-save, mid-evaluation)
            deadline = time.monotonic() + 120
            while saved() == before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:  # finished before the kill
            assert proc.returncode == 0, proc.stderr.read()
            break
        proc.kill()
        proc.wait()
        kills += 1
    assert kills >= 2  # the job was really interrupted
    assert final(out) == final(ref)
    assert final(out.parent / "pretrain" / "pre") == final(ref.parent / "pretrain" / "pre")


def test_weights_with_nan_or_inf_are_refused_at_load_with_the_tensor_name(tmp_path):
    from safetensors.torch import save_file

    import dcal

    vit = tiny_model().backbone
    state = {k: v.clone().contiguous() for k, v in vit.state_dict().items()}
    state["blocks.1.attn.qkv.weight"][0, 0] = math.nan
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.weight.*NaN or inf"):
        dcal.create_model("deit_tiny_patch16_224", num_classes=3, img_size=32, depth=3, embed_dim=48,
                          num_heads=3, pretrained_file=str(path))


def test_json_files_never_hold_nan_literals():
    from dcal.checkpoint import json_text

    text = json_text({"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}
    assert "NaN" not in text and "Infinity" not in text


def test_a_closed_pipe_ends_a_command_quietly():
    proc = subprocess.run(f"{sys.executable} -m dcal.cli recipes | head -1", shell=True, capture_output=True,
                          text=True)
    assert proc.stdout.strip() and proc.stderr == ""


def test_a_pretraining_stem_cannot_place_the_cache_outside_its_folder(tmp_path):
    from dcal.config import ConfigError
    from dcal.pretrain import cache_folder

    assert cache_folder("recipes/pre.yaml", tmp_path) == tmp_path / "pretrain" / "pre"
    for bad in ("x/...yaml", "..yaml"):
        with pytest.raises(ConfigError, match="cannot name the pretraining folder"):
            cache_folder(bad, tmp_path)


def test_claim_marks_only_new_or_empty_folders(tmp_path):
    assert claim_folder(tmp_path / "new", "dcal demo", "dcal")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    assert not claim_folder(tmp_path / "used", "dcal demo", "dcal")
    assert read_made_by(tmp_path / "used") is None


def test_deep_or_huge_yaml_is_refused_in_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("data: {classes: " + "[" * 5000 + "]" * 5000 + "}\n")
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (2 << 20) + "\n{}\n")
    for path, words in ((deep, "nested deeper than"), (huge, "characters long")):
        assert main(["train", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1


def test_recipes_copy_never_writes_through_a_link(tmp_path, capsys):
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "demo.yaml").symlink_to(target)
    assert main(["recipes", "demo", "--copy", str(tmp_path / "out")]) == 2
    assert "a link" in capsys.readouterr().err and target.read_text() == "precious"
    (tmp_path / "out" / "demo.yaml").unlink()
    (tmp_path / "out" / "demo.yaml").symlink_to(tmp_path / "dangling")  # a link to nothing: not created through
    assert main(["recipes", "demo", "--copy", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "dangling").exists()


@needs_shared
def test_training_on_the_test_split_says_the_scores_are_not_held_out(tmp_path, capsys):
    assert main(["train", "--config", "configs/demo.yaml", "model.pretrain=null", *SYNTHETIC_RUN,
                 "data.dataset=cub", f"data.root={SHARED_DATA / 'cub100'}", "data.classes=1-2", "train.epochs=1",
                 "data.train_splits=[train,test]", f"output_dir={tmp_path / 'r'}"]) == 0
    assert "are NOT held out" in capsys.readouterr().err


def test_an_evaluation_that_fails_loses_no_trained_epoch(tmp_path, monkeypatch):
    """The epoch is checkpointed before its evaluation: after an evaluation that runs out of memory, --resume
    evaluates the trained epoch without training it again, and the run ends as an uninterrupted one."""
    import dcal.engine.run as run_module
    from dcal.config import load_config
    from dcal.engine import fit

    def cfg(out: Path):
        return load_config("configs/demo.yaml", ["model.pretrain=null", *SYNTHETIC_RUN, "train.save_every_steps=0",
                                                 f"output_dir={out}"])

    ref = fit(cfg(tmp_path / "ref"))
    real, calls = run_module.evaluate, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second epoch's evaluation
            raise MemoryError("out of memory in the evaluation")
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate", failing_once)
    with pytest.raises(MemoryError):
        fit(cfg(tmp_path / "run"))
    monkeypatch.setattr(run_module, "evaluate", real)
    steps_before = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert steps_before["epoch"] == 1  # epoch 2 trained, not yet recorded
    resumed = fit(cfg(tmp_path / "run"), resume=True)
    drop = ("train_time_s", "images_per_s")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in ref.items() if k not in drop}
