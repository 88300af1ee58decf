"""The ``dcal`` command line: train, eval, demo, visualize, complexity, ablation."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

EPILOG = "Config keys are dotted (data.root=..., train.epochs=...); see configs/ and the README."


def _add_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run directory written by 'dcal train' (uses best, else last, weights)")
    src.add_argument("--checkpoint", help="a .pth training checkpoint or a .safetensors weights export")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=/data/cub")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcal", description="Dual Cross-Attention Learning (CVPR 2022) on timm Vision Transformers.",
        epilog=EPILOG,
    )
    from dcal import __version__

    parser.add_argument("--version", action="version", version=f"dcal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    p = sub.add_parser(
        "train", help="train a model from a YAML recipe (FGVC or Re-ID)",
        epilog=EPILOG + " Under torchrun (torchrun --nproc_per_node=N -m dcal train ...) every process runs it: "
        "distributed data parallel, rank 0 writes.",
    )
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/fgvc/cub_deit_tiny.yaml")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from last.pth (mid-epoch ones included)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5")

    p = sub.add_parser("eval", help="evaluate a trained run or checkpoint (top-1, or mAP/CMC)", epilog=EPILOG)
    _add_source(p)
    p.add_argument("--json", help="also write the metrics to this JSON file")

    p = sub.add_parser("demo", help="train SA-only and DCAL on a generated fine-grained set (CPU, minutes)")
    p.add_argument("--output-dir", default="runs/demo", help="where both runs and the picture go")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo config")

    p = sub.add_parser("visualize", help="save attention-rollout pictures of test images for a trained model")
    _add_source(p)
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--output", default=None, help="PNG path (default: <run>/rollout.png or ./rollout.png)")

    sub.add_parser("complexity", help="print parameters and FLOPs at inference (the paper's Table 3)")

    from dcal.ablation import SETS

    p = sub.add_parser("ablation", help="train the paper's ablation variants over several seeds; table + picture",
                       epilog=f"Sets: {', '.join(SETS)} (comma-separated to run several into one folder). " + EPILOG)
    p.add_argument("--config", required=True, help="YAML recipe every variant starts from")
    p.add_argument("--set", default="table3", help="table3 | selection | pairs | blocks, or several: table3,selection")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant: train.seed, train.seed+1, ...")
    p.add_argument("--output-dir", default=None, help="default: runs/ablation_<sets>_<recipe name>")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every variant, e.g. train.epochs=5")
    return parser


def cmd_train(args: argparse.Namespace) -> Any:
    from dcal.config import load_config
    from dcal.engine import fit

    return fit(load_config(args.config, args.overrides), resume=args.resume)


def cmd_eval(args: argparse.Namespace) -> Any:
    from dcal.engine import evaluate_checkpoint, load_for_eval

    cfg, model = load_for_eval(args.run, args.checkpoint, args.overrides)
    metrics = evaluate_checkpoint(cfg, model)
    for k, v in metrics.items():
        print(f"{k:>20}: {v:.2f}" if isinstance(v, float) else f"{k:>20}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def cmd_demo(args: argparse.Namespace) -> Any:
    from dcal.demo import run_demo

    return run_demo(args.output_dir, args.overrides)


def cmd_visualize(args: argparse.Namespace) -> Any:
    import torch

    from dcal.data.transforms import config_mean_std
    from dcal.engine import build_datasets, load_for_eval
    from dcal.visualize import denormalize, rollout_maps, save_rollout_figure

    cfg, model = load_for_eval(args.run, args.checkpoint, args.overrides)
    sets = build_datasets(cfg, train=False)
    data = sets["test"] if cfg.task == "fgvc" else sets["query"]
    n = min(args.num_images, len(data))
    step = max(1, len(data) // n)
    items = [data[i * step] for i in range(n)]
    batch = torch.stack([it[0] for it in items])
    mean, std = config_mean_std(cfg)
    if cfg.task == "fgvc":
        preds = model.eval().predict(batch).argmax(-1).tolist()
        titles = [f"{data.classes[it[1]][:14]}\npred {data.classes[p][:14]}"
                  for it, p in zip(items, preds, strict=True)]
    else:
        titles = [f"id {it[1]} cam {it[2]}" for it in items]
    out = args.output or str(Path(args.run or ".") / "rollout.png")
    path = save_rollout_figure(out, denormalize(batch, mean, std), {"DCAL": rollout_maps(model, batch)}, titles)
    print(f"saved {path}")
    return path


def cmd_complexity(args: argparse.Namespace) -> Any:
    from dcal.model.complexity import complexity_rows, format_table

    print("Inference cost (PWCA is training-only and adds nothing); FLOPs counted as multiply-accumulates.")
    rows = complexity_rows()
    print(format_table(rows))
    return rows


def cmd_ablation(args: argparse.Namespace) -> Any:
    from dcal.ablation import format_markdown, run_ablation

    sets = [s.strip() for s in args.set.split(",") if s.strip()]
    summary = run_ablation(args.config, sets, args.seeds, args.overrides, args.output_dir)
    print(format_markdown(summary))
    return summary


def _rank_tag() -> str:
    """`` (rank R)`` inside a torchrun process, so that its error lines say which process spoke."""
    from dcal.distributed import launched_by_torchrun

    return f" (rank {os.environ['RANK']})" if launched_by_torchrun() else ""


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "visualize": cmd_visualize,
            "complexity": cmd_complexity, "ablation": cmd_ablation}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dcal.config import ConfigError

    try:
        COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as e:
        # user errors (bad config, layout, paths, data, diverged run): one clear line, no traceback
        print(f"dcal {args.command}: error{_rank_tag()}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; last.pth holds the last checkpoint (continue with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
