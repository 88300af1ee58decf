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


def test_profile_inference_prints_the_forwards(capsys):
    assert load_script("profile_inference").main(["--img-size", "32", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "deit_tiny_patch16_224 32x32 batch 1" in out
    names = ("timm", "DCAL SA-only", "DCAL (SA + GLCA)", "DCAL, two-pass")
    assert all(f"{name} " in out for name in names) and "x timm" in out


def test_profile_inference_two_pass_is_the_same_model_without_the_workspace():
    from tests.helpers import tiny_model

    script = load_script("profile_inference")
    model = tiny_model().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        model.release_workspace()
        got = script.two_pass(model, x)
    assert "_kept_workspace" not in vars(model) and "_workspace" not in vars(model)
    assert torch.equal(got["selected"], want["selected"])
    torch.testing.assert_close(got["logits"]["glca"], want["logits"]["glca"], atol=1e-5, rtol=1e-5)


TINY = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8)


def _tiny_settings(bench):
    return (bench.QuickSetting("tiny FGVC", "deit_tiny_patch16_224", "fgvc", (32, 32), (1, 2), 2, 5, TINY),
            bench.QuickSetting("tiny Re-ID", "deit_tiny_patch16_224", "reid", (32, 16), (2,), 2, 7, TINY))


def test_parts_are_the_forwards_they_time():
    """The per-part runs compute what timm's forward and DCAL's predict / embed compute, each part timed."""
    import dcal

    bench = load_bench()
    for st in _tiny_settings(bench):
        torch.manual_seed(0)
        model = dcal.create_model(st.arch, task=st.task, num_classes=st.num_classes, img_size=st.img_size,
                                  glca_blocks=1, pwca_blocks=0, **st.timm_kwargs).eval()
        x = torch.randn(3, 3, *st.img_size)
        with torch.inference_mode():
            timm_clock, dcal_clock = bench._Clock(), bench._Clock()
            assert torch.equal(bench.timm_parts(model.backbone, x, timm_clock), model.backbone(x))
            want = model.predict(x) if st.task == "fgvc" else model.embed(x)
            assert torch.equal(bench.dcal_parts(model, x, dcal_clock), want)
        assert tuple(timm_clock.parts) == bench.TIMM_PARTS and tuple(dcal_clock.parts) == bench.DCAL_PARTS
        assert all(t >= 0 for t in (*timm_clock.parts.values(), *dcal_clock.parts.values()))


def test_quick_prints_the_headline_ratios_and_the_per_part_tables(monkeypatch, tmp_path, capsys):
    """``--quick`` end to end at a tiny size (its settings swapped for tiny ones): one row per (setting, batch),
    a per-part table per setting, the same report in the markdown file and the medians in the JSON."""
    import json

    bench = load_bench()
    monkeypatch.setattr(bench, "QUICK", _tiny_settings(bench))
    md, js = tmp_path / "quick.md", tmp_path / "quick.json"
    results = bench.main(["--quick", "--reps", "1", "--threads", "1", "--markdown", str(md), "--json", str(js)])
    out = capsys.readouterr().out
    assert "| setting | batch | timm s/batch | SA-only / timm | DCAL / timm |" in out
    assert out.count("| tiny FGVC |") == 2 and out.count("| tiny Re-ID |") == 1
    assert "Where the time goes, tiny FGVC, batch 2" in out and "Where the time goes, tiny Re-ID, batch 2" in out
    for part in bench.DCAL_PARTS:
        assert out.count(f"| {part} |") == 2
    assert md.read_text().strip() == out.strip()
    rows = json.loads(js.read_text())["quick"]
    assert [(r["setting"], r["batch"]) for r in rows] == [("tiny FGVC", 1), ("tiny FGVC", 2), ("tiny Re-ID", 2)]
    assert rows == results["quick"] and all(r["timm"] > 0 and r["dcal"] > 0 for r in rows)
