"""Run the benchmarks and paste their own output into benchmarks/README.md between the BENCHMARK markers.

    python benchmarks/update_readme.py [--model-args "--cases fgvc reid"] [--model-markdown run.md]
                                       [--skip-reid-eval] [--readme benchmarks/README.md]

* the model benchmark (``benchmarks/bench_model.py``) runs in a subprocess with ``--markdown`` (or its saved
  markdown is reused with ``--model-markdown``, since a full run takes a while on a small CPU);
* the re-id evaluation benchmark (``benchmarks/bench_reid_eval.py``, if present) runs in a subprocess and its
  printed output is pasted as is;
* everything between ``<!-- BENCHMARK:START -->`` and ``<!-- BENCHMARK:END -->`` in the README is replaced.
  Without the markers nothing is written: the section is printed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
START, END = "<!-- BENCHMARK:START -->", "<!-- BENCHMARK:END -->"


def run_model_benchmark(extra_args: str) -> str:
    """Markdown report of ``bench_model.py`` (its progress goes to this process's stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        md = Path(tmp) / "model.md"
        cmd = [sys.executable, str(HERE / "bench_model.py"), *shlex.split(extra_args), "--markdown", str(md)]
        print("running:", shlex.join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        return md.read_text()


def run_reid_eval_benchmark() -> str | None:
    """Printed output of ``bench_reid_eval.py``, or None (with a message) when that script does not exist."""
    script = HERE / "bench_reid_eval.py"
    if not script.is_file():
        print(f"{script} not found: the re-id evaluation benchmark is skipped", file=sys.stderr)
        return None
    cmd = [sys.executable, str(script)]
    print("running:", shlex.join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return f"Command: `python benchmarks/bench_reid_eval.py`\n\n```\n{done.stdout.strip()}\n```\n"


def _marker_line(text: str, marker: str) -> int:
    """Where the line holding only ``marker`` starts, or -1 (a marker quoted inside prose does not count)."""
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    return next((offsets[n] for n, line in enumerate(lines) if line.rstrip("\r\n") == marker), -1)


def replace_section(text: str, body: str) -> str:
    """``text`` with the part between the marker lines replaced by ``body`` (markers kept)."""
    i, j = _marker_line(text, START), _marker_line(text, END)
    if i < 0 or j < i:
        raise ValueError(f"marker lines {START} ... {END} not found in order")
    return text[: i + len(START)] + "\n" + body.strip() + "\n" + text[j:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-args", default="", help="extra arguments for bench_model.py, as one string")
    ap.add_argument("--model-markdown", type=Path, default=None,
                    help="reuse this saved `bench_model.py --markdown` output instead of running it again")
    ap.add_argument("--skip-reid-eval", action="store_true", help="leave the re-id evaluation benchmark out")
    ap.add_argument("--readme", type=Path, default=REPO / "benchmarks" / "README.md")
    args = ap.parse_args(argv)

    parts = ["#### Model: DCAL vs plain timm and the FLOP floor (`benchmarks/bench_model.py`)", ""]
    parts.append(args.model_markdown.read_text() if args.model_markdown else run_model_benchmark(args.model_args))
    if not args.skip_reid_eval:
        reid = run_reid_eval_benchmark()
        if reid:
            parts += ["", "#### Re-ID evaluation (`benchmarks/bench_reid_eval.py`)", "", reid]
    body = "\n".join(parts)

    readme = args.readme
    text = readme.read_text() if readme.is_file() else ""
    if _marker_line(text, START) < 0 or _marker_line(text, END) < 0:
        print(body)
        print(f"\n{readme}: markers {START} / {END} absent; nothing written", file=sys.stderr)
        return 1
    readme.write_text(replace_section(text, body))
    print(f"updated the benchmark section of {readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
