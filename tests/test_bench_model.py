"""benchmarks/bench_model.py's device handling (no timing here: the benchmark itself measures)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import load_script


def load_bench():
    return load_script("bench_model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the refusal is for machines without")
def test_cuda_run_refuses_cleanly_without_a_gpu(capsys, tmp_path):
    bench = load_bench()
    out = tmp_path / "out.md"
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda", "--cases", "fgvc", "--markdown", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device is available" in err and "--device cpu" in err
    assert not out.exists()  # nothing measured, nothing written


def test_device_check_and_inference_batch_sweep():
    bench = load_bench()
    assert bench.check_device("cpu") is None
    assert (bench.check_device("cuda") is None) == torch.cuda.is_available()
    assert bench.CASES["fgvc"].inference_batches == (1, 8, 32)
    assert bench.CASES["reid"].inference_batches == (bench.CASES["reid"].batch,)


def test_update_readme_replaces_between_the_marker_lines_only():
    """A marker quoted in the README's prose (the table describing update_readme.py does) is not a marker."""
    mod = load_script("update_readme")
    text = (f"| `update_readme.py` | pastes between `{mod.START}` and `{mod.END}` |\n\n"
            f"## Results\n{mod.START}\nold numbers\n{mod.END}\ntail\n")
    got = mod.replace_section(text, "new numbers")
    assert got == text.replace("old numbers", "new numbers")
    with pytest.raises(ValueError, match="marker lines"):
        mod.replace_section(text.replace(f"\n{mod.END}\n", "\n"), "x")


def test_profile_inference_prints_the_three_forwards(capsys):
    assert load_script("profile_inference").main(["--img-size", "32", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "deit_tiny_patch16_224 32x32 batch 1" in out
    assert all(f"{name} " in out for name in ("timm", "DCAL SA-only", "DCAL (SA + GLCA)")) and "x timm" in out
