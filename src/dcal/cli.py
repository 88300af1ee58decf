"""The ``dcal`` command line: train, eval, demo, visualize, complexity, ablation, predict, embed, search, index,
export, report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from dcal.vocabulary import FEATURE_DTYPES, FUSIONS, INDEX_BACKENDS, INDEX_KINDS, RERANK_METHODS, RETRIEVAL_METRICS

EPILOG = "Config keys are dotted (data.root=..., train.epochs=...); see configs/ and the README."


class ConsoleHandler(logging.Handler):
    """How the commands show dcal's log messages (``logging.getLogger(__name__)`` in every module): the message
    alone, one line, INFO on stdout and warnings on stderr. The stream is looked up at each message, so a
    redirected ``sys.stdout`` (a run's ``train.log`` under ``dcal ablation``, a test's capture) receives them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 (logging's contract: a failing handler reports, never raises)
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """Show dcal's messages from ``level`` up on the console (:class:`ConsoleHandler`), once per process."""
    logger = logging.getLogger("dcal")
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        logger.addHandler(ConsoleHandler())
    logger.setLevel(level)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it in words (defaults that are
    None stand for "the run's own setting" and similar, which the help text spells out)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class _IntermixedParser(argparse.ArgumentParser):
    """A command's parser that takes options after positionals too (``dcal train --config C key=value --resume
    key=value``): plain argparse ends ``key=value ...`` at the first option and rejects what follows."""

    _inner = False  # parse_known_intermixed_args calls parse_known_args itself: that call is the plain one

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._inner or self._subparsers is not None:  # argparse cannot intermix a parser with subcommands
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def _at_least_one(text: str) -> int:
    """argparse type: an int >= 1."""
    if not text.strip().lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expects an int >= 1, got {text!r}")
    return int(text)


def _threads_parent() -> argparse.ArgumentParser:
    """The ``--threads`` option of the commands that compute (a parent parser: one definition for all)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--threads", type=_at_least_one, default=None,
                        help="CPU threads for PyTorch's operators (default: torch's own choice, usually one per "
                             "core, or OMP_NUM_THREADS): set it when other jobs share the machine")
    return parent


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given; torch's default otherwise."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _add_source(p: argparse.ArgumentParser, overrides: bool = True, required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    unset = "" if required else " (default: none, for features files only)"
    src.add_argument("--run", help=f"a run directory written by 'dcal train' (its best, else last, weights){unset}")
    src.add_argument("--checkpoint", help=f"a .pth training checkpoint or a .safetensors weights export{unset}")
    if overrides:
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=/data/cub")


def _add_inference(p: argparse.ArgumentParser, run_fusion: bool = False) -> None:
    """Batch, workers, device and fusion options (``run_fusion``: fusion defaults to the run's eval.fusion)."""
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the run's eval.batch_size)")
    p.add_argument("--workers", type=int, default=0, help="image-reading processes (0: in this process)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--fusion", default=None if run_fusion else "sa+glca", choices=FUSIONS,
                   help="branches to combine" + (" (default: the run's eval.fusion)" if run_fusion else ""))


def _add_embedding(p: argparse.ArgumentParser) -> None:
    _add_inference(p, run_fusion=True)
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the mirrored image (default: the run's eval.flip)")
    p.add_argument("--after-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="features after the BNNeck (default: the run's eval.reid_feature)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcal", description="Dual Cross-Attention Learning (CVPR 2022) on timm Vision Transformers.",
        epilog=EPILOG,
    )
    from dcal import __version__

    parser.add_argument("--version", action="version", version=f"dcal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True, parser_class=_IntermixedParser)
    threads = _threads_parent()

    p = sub.add_parser(
        "train", help="train a model from a YAML recipe (FGVC or Re-ID)", parents=[threads],
        epilog=EPILOG + " Under torchrun (torchrun --nproc_per_node=N -m dcal train ...) every process runs it: "
        "distributed data parallel, rank 0 writes.",
    )
    p.add_argument("--config", required=True, help="YAML recipe: a file, or a packaged recipe's name such as "
                   "fgvc/cub_deit_tiny (see 'dcal recipes')")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from last.pth (mid-epoch ones included)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5")

    p = sub.add_parser("eval", help="evaluate a trained run or checkpoint (top-1, or mAP/CMC)", epilog=EPILOG,
                       parents=[threads])
    _add_source(p)
    p.add_argument("--json", help="also write the metrics to this JSON file (default: printed only)")
    p.add_argument("--roc", default=None,
                   help="Re-ID: the ROC picture (same person or not: TPR against FPR over all query x gallery pairs) "
                        "(default: <run>/roc.png with --run, unless a file dcal did not write is there; none with "
                        "--checkpoint)")

    p = sub.add_parser("demo", help="pretrain a small ViT, fine-tune SA-only and DCAL on a generated fine-grained "
                       "set (CPU, minutes)", parents=[threads])
    p.add_argument("--output-dir", default="runs/demo", help="where the runs and the picture go")
    p.add_argument("--fresh", action="store_true", help="replace the demo's own runs (else finished ones are reused)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo config")

    p = sub.add_parser("visualize", help="attention pictures: SA rollout + GLCA queries, GLCA and PWCA attention",
                       parents=[threads])
    _add_source(p)
    p.add_argument("--num-images", type=_at_least_one, default=8, help="images in the picture (one column each)")
    p.add_argument("--images", nargs="+", default=None, help="your own image files/folders (default: test images)")
    p.add_argument("--output", default=None, help="PNG path (default: <run>/rollout.png or ./rollout.png)")

    p = sub.add_parser("predict", help="top-k classes of image files and folders (FGVC)", parents=[threads])
    _add_source(p, overrides=False)
    p.add_argument("paths", nargs="+", help="image files and folders (searched recursively)")
    p.add_argument("--topk", type=_at_least_one, default=5,
                   help="classes listed per image, most probable first (more than the model has: all of them)")
    p.add_argument("--output", help="also write the predictions to this .csv or .json file (default: printed only)")
    _add_inference(p)

    p = sub.add_parser("embed", help="Re-ID features of image folders, saved for 'dcal search' and 'dcal index'",
                       parents=[threads], epilog="A folder --output is a shard set: resumable (run the same command "
                       "again after a kill) and shared by the processes of torchrun --nproc_per_node=N -m dcal embed.")
    _add_source(p, overrides=False)
    p.add_argument("paths", nargs="+", help="image files and folders (searched recursively)")
    p.add_argument("--output", required=True, help="a .safetensors file (features + index: paths, pid, camid) or a "
                   "folder: a shard set for large galleries")
    p.add_argument("--shard-size", type=_at_least_one, default=10_000, help="images per shard (folder --output)")
    p.add_argument("--dtype", default="float16", choices=FEATURE_DTYPES,
                   help="stored feature precision (folder --output; a .safetensors file is float32)")
    _add_embedding(p)

    p = sub.add_parser("search", help="rank a gallery for each query; mAP/CMC when ids are known; visrank pictures",
                       parents=[threads])
    _add_source(p, overrides=False, required=False)
    p.add_argument("--query", required=True, help="query folder, or a features file from 'dcal embed'")
    p.add_argument("--gallery", required=True, help="gallery folder, or a features file from 'dcal embed'")
    p.add_argument("--output-dir", default="search", help="ranking.csv, metrics.json, visrank/")
    p.add_argument("--max-rank", type=_at_least_one, default=50, help="ranked gallery items per query in the CSV")
    p.add_argument("--num-vis", type=int, default=100, help="queries drawn with their top-10 (-1: all, 0: none)")
    p.add_argument("--metric", default="euclidean", choices=RETRIEVAL_METRICS,
                   help="distance between L2-normalised features (the same ranking; cosine reads 1 - cos)")
    p.add_argument("--save-gallery",
                   help="also save the gallery features here, to reuse them in later searches (default: not saved)")
    p.add_argument("--rerank", default=None, choices=RERANK_METHODS,
                   help="k-reciprocal re-ranking: on the sparse neighbour graph (bounded memory) or the dense "
                        "N x N matrices; the same distances (default: none)")
    p.add_argument("--chunk-size", type=_at_least_one, default=None,
                   help="query x gallery distances held at once (default: from the free memory)")
    p.add_argument("--threshold", type=float, default=None,
                   help="a query whose best match is farther than this distance is 'not in the gallery' (the CSV's "
                        "in_gallery column); 'dcal eval' reports thresholds for FPR 1e-2..1e-4 (default: none)")
    _add_embedding(p)

    _add_index_parser(sub, threads)

    p = sub.add_parser("export", help="export to ONNX (inference graph) and/or .safetensors (weights + config)",
                       parents=[threads])
    _add_source(p, overrides=False)
    p.add_argument("--onnx", help="ONNX file to write (default: none)")
    p.add_argument("--safetensors", help="weights + config .safetensors to write, load with dcal.load_model "
                   "(default: none)")
    p.add_argument("--opset", type=int, default=17, help="ONNX operator set version of the exported graph")
    p.add_argument("--fusion", default="sa+glca", choices=FUSIONS, help="branches the exported graph combines")
    p.add_argument("--after-bn", action="store_true", help="Re-ID: embedding after the BNNeck")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with PyTorch")

    p = sub.add_parser("report", help="training curves (PNG) and a Markdown summary of one or more runs")
    p.add_argument("runs", nargs="+", help="run directories (several: curves overlaid, config differences)")
    p.add_argument("--output-dir", default=None, help="default: the run (one run) or ./report (several)")

    sub.add_parser("complexity", help="print parameters and FLOPs at inference (the paper's Table 3)")

    p = sub.add_parser("recipes", help="list the packaged recipes, print one, or copy one out to edit it")
    p.add_argument("name", nargs="?", default=None, help="a recipe, e.g. fgvc/cub_deit_tiny (default: list them)")
    p.add_argument("--copy", metavar="DIR", default=None,
                   help="write the recipe into DIR (an existing file is not replaced) (default: print it)")

    from dcal.ablation import SETS

    p = sub.add_parser("ablation", help="train the paper's ablation variants over several seeds; table + picture",
                       parents=[threads],
                       epilog=f"Sets: {', '.join(SETS)} (comma-separated to run several into one folder). " + EPILOG)
    p.add_argument("--config", required=True, help="YAML recipe every variant starts from (a file or a packaged "
                   "recipe's name)")
    p.add_argument("--set", default="table3", help="table3 | selection | pairs | blocks, or several: table3,selection")
    p.add_argument("--variants", default=None, metavar="NAMES",
                   help="only these variants of the set(s), comma-separated names or folder names, e.g. "
                        "'SA only,DCAL' (default: all)")
    p.add_argument("--seeds", type=_at_least_one, default=3, help="seeds per variant: train.seed, train.seed+1, ...")
    p.add_argument("--max-seeds", type=_at_least_one, default=None, metavar="N",
                   help="then N seeds for each variant within two standard errors of its reference (and for that "
                        "reference): a protocol's '3 seeds, 5 where closer than 2 SE' (default: --seeds)")
    p.add_argument("--output-dir", default=None, help="default: runs/ablation_<sets>_<recipe name> (each run goes "
                   "to DIR/<variant>/seed<k>: output_dir=... is refused)")
    p.add_argument("--pretrain", default=None, metavar="RECIPE",
                   help="pretraining recipe: one SA-only backbone, trained once into pretrain/ beside OUTPUT_DIR "
                        "(reused while unchanged) that each variant and seed fine-tunes from (default: model.pretrain)")
    p.add_argument("--eval-every", type=_at_least_one, default=None, metavar="K",
                   help="evaluate every K epochs for the curves (train.eval_every; default: the recipe's); the "
                        "number in the table stays the last epoch's")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every variant, e.g. train.epochs=5")
    return parser


def _add_index_parser(sub: Any, threads: argparse.ArgumentParser) -> None:
    """``dcal index build|add|search|info|remove`` (:mod:`dcal.gallery.index`)."""
    p = sub.add_parser("index", help="a gallery index on disk (faiss or Milvus): build, add, search, info, remove",
                       epilog="Needs pip install 'dcal[search]' (faiss-cpu); the Milvus backend 'dcal[milvus]'.")
    cmds = p.add_subparsers(dest="index_command", metavar="action", required=True, parser_class=_IntermixedParser)
    sources = "features files (dcal embed), shard-set folders (dcal embed --output FOLDER) or image folders"

    q = cmds.add_parser("build", help="a new index from features or images", parents=[threads])
    q.add_argument("index", help="the index folder to create")
    q.add_argument("sources", nargs="+", help=sources + " (image folders need --run or --checkpoint)")
    q.add_argument("--type", default="auto", metavar="TYPE",
                   help=f"{' | '.join(INDEX_KINDS)}, or any faiss index_factory string (auto: flat up to 2M vectors, "
                        "else ivf)")
    q.add_argument("--backend", default="faiss", choices=INDEX_BACKENDS, help="where the vectors live")
    q.add_argument("--milvus-uri", default=None, help="Milvus server (http://host:19530) or a milvus-lite .db file "
                   "(default: milvus.db in the index folder)")
    q.add_argument("--collection", default=None, help="Milvus collection name (default: a new random one)")
    q.add_argument("--metric", default="euclidean", choices=RETRIEVAL_METRICS, help="distance searches report")
    q.add_argument("--overwrite", action="store_true", help="replace an index already in the folder")
    q.add_argument("--calibrate-with", default=None, metavar="QUERIES",
                   help="queries like the ones you will search (features file, shard set, or image folder with "
                        "--run): the default nprobe / efSearch is calibrated to recall@10 0.99 on them (default: on "
                        "the gallery's own vectors)")
    _add_source(q, overrides=False, required=False)
    _add_embedding(q)

    q = cmds.add_parser("add", help="append images or features to an index (nothing re-embedded)", parents=[threads])
    q.add_argument("index", help="the index folder")
    q.add_argument("sources", nargs="+", help=sources + "; items whose path the index holds are skipped")
    _add_source(q, overrides=False, required=False)
    _add_embedding(q)

    q = cmds.add_parser("search", help="the nearest gallery items of each query; ranking.csv and visrank/",
                        parents=[threads])
    q.add_argument("index", help="the index folder")
    q.add_argument("--query", required=True, help="query features file, shard set, or image folder (with --run)")
    q.add_argument("--topk", type=_at_least_one, default=50, help="ranked gallery items per query")
    q.add_argument("--output-dir", default="search", help="ranking.csv, visrank/")
    q.add_argument("--num-vis", type=int, default=100, help="queries drawn with their top-10 (-1: all, 0: none)")
    q.add_argument("--cameras", default=None, help="only gallery items of these cameras, numbered as in the file "
                   "names (c1 = 1), e.g. 1,3 (default: all)")
    q.add_argument("--frames", default=None, metavar="FIRST:LAST",
                   help="only gallery items whose name's frame / time number lies in this window (default: all)")
    q.add_argument("--no-protocol", action="store_true", help="keep the gallery items of the query's identity "
                   "under the query's camera, and junk pid -1 (left out by default, as in evaluation)")
    q.add_argument("--nprobe", type=_at_least_one, default=None,
                   help="IVF lists searched (default: the index's, calibrated at build; dcal index info shows it): "
                        "more is slower and nearer exact")
    q.add_argument("--ef-search", type=_at_least_one, default=None,
                   help="HNSW search breadth (default: the index's, calibrated at build)")
    q.add_argument("--metric", default=None, choices=RETRIEVAL_METRICS, help="default: the index's")
    _add_source(q, overrides=False, required=False)
    _add_embedding(q)

    q = cmds.add_parser("info", help="what an index holds and how it was built")
    q.add_argument("index", help="the index folder")
    q.add_argument("--json", action="store_true", help="print JSON")

    q = cmds.add_parser("remove", help="remove items by path or identity (where the index type allows it)")
    q.add_argument("index", help="the index folder")
    q.add_argument("--path", nargs="+", default=[], help="gallery paths as the index stores them (see ranking.csv)")
    q.add_argument("--pid", nargs="+", type=int, default=[], help="every item of these identities")


def cmd_train(args: argparse.Namespace) -> Any:
    from dcal.config import load_config
    from dcal.pretrain import train_stages

    return train_stages(load_config(args.config, args.overrides), resume=args.resume)


def print_metrics(metrics: dict[str, Any]) -> None:
    """One line per number (percentages as written to the files; a list such as the CMC curve stays in the
    file)."""
    for k, v in metrics.items():
        if not isinstance(v, list):
            print(f"{k:>20}: {v:.2f}" if isinstance(v, float) else f"{k:>20}: {v}")


def cmd_eval(args: argparse.Namespace) -> Any:
    from dcal.checkpoint import atomic_write_text
    from dcal.engine import evaluate_checkpoint
    from dcal.loading import load_model

    loaded = load_model(args.run, args.checkpoint, "cpu", args.overrides)
    reid = loaded.cfg.task == "reid"
    metrics = evaluate_checkpoint(loaded.cfg, loaded.model, roc=reid)
    curve = metrics.pop("roc_curve", None)
    print_metrics(metrics)
    if args.json:
        from dcal.checkpoint import json_text

        atomic_write_text(args.json, json_text(metrics))
    roc = args.roc or (str(Path(args.run) / "roc.png") if args.run else None)
    if curve is not None and roc is None:
        print("ROC picture: not saved (give --roc FILE; with --run it goes to <run>/roc.png)")
    elif curve is not None:
        from dcal.visualize import is_dcal_picture

        if Path(roc).exists() and not args.roc and not is_dcal_picture(roc):
            print(f"ROC picture: not saved, {roc} exists and dcal did not write it (give --roc FILE)")
        else:
            print(f"saved {_save_roc(roc, curve, metrics)}")
    return metrics


def _save_roc(path: str, curve: dict[str, list[float]], metrics: dict[str, Any]) -> Path:
    from dcal.metrics.reid import ROC_FPRS, fpr_tag
    from dcal.visualize import save_roc_figure

    points = {f: (metrics[f"tpr_at_fpr_{fpr_tag(f)}"] / 100.0, metrics[f"threshold_at_fpr_{fpr_tag(f)}"])
              for f in ROC_FPRS if f"tpr_at_fpr_{fpr_tag(f)}" in metrics}
    return save_roc_figure(path, curve["fpr"], curve["tpr"], points)


def cmd_demo(args: argparse.Namespace) -> Any:
    from dcal.demo import run_demo

    return run_demo(args.output_dir, args.overrides, fresh=args.fresh)


def cmd_visualize(args: argparse.Namespace) -> Any:
    import torch

    from dcal.data.transforms import config_mean_std
    from dcal.inference import list_images, run_batches
    from dcal.loading import load_model
    from dcal.visualize import save_attention_picture

    loaded = load_model(args.run, args.checkpoint, "cpu", args.overrides)
    cfg, model = loaded.cfg, loaded.model
    truths = None  # the true class of each column, when known (the test split's)
    if args.images:
        files = list_images(args.images)[: args.num_images]
        batch, done, failed = run_batches(lambda x: x, files, loaded.transform, torch.device("cpu"))
        for i, err in failed.items():
            print(f"skipped {files[i]}: {err}", file=sys.stderr)
        if batch is None:
            raise ValueError(f"none of the images in {args.images} could be read")
        labels = [Path(files[i]).name for i in done]
    else:
        batch, labels = _test_images(cfg, args.num_images)
        truths = labels if cfg.task == "fgvc" else None
    if len(batch) < 2 and model.cfg.pwca_blocks:
        raise ValueError("the PWCA picture pairs images: give at least 2")
    # FGVC: one title line per column with the predicted class (the model is named "pred" there)
    classes = (loaded.classes or [str(c) for c in range(model.cfg.num_classes)]) if cfg.task == "fgvc" else None
    out = args.output or str(Path(args.run or ".") / "rollout.png")
    path = save_attention_picture(out, {"pred": model}, batch, *config_mean_std(cfg), labels, classes, truths)
    print(f"saved {path}")
    return path


def _test_images(cfg: Any, num: int) -> tuple[Any, list[str]]:
    """``num`` images spread over the run's test (FGVC) or query (Re-ID) split, with their class names (FGVC) or
    identity and 1-based camera (Re-ID)."""
    import torch

    from dcal.engine import build_datasets

    sets = build_datasets(cfg, train=False)
    data = sets["test"] if cfg.task == "fgvc" else sets["query"]
    n = min(num, len(data))
    step = max(1, len(data) // n)
    items = [data[i * step] for i in range(n)]
    if cfg.task == "fgvc":
        titles = [data.classes[it[1]] for it in items]
    else:
        titles = [f"id {it[1]} cam {it[2] + 1}" for it in items]  # 1-based, as c1 in the file names
    return torch.stack([it[0] for it in items]), titles


def cmd_predict(args: argparse.Namespace) -> Any:
    from dcal.inference import predict, predictions_table, write_predictions
    from dcal.loading import load_model

    loaded = load_model(args.run, args.checkpoint, args.device)
    preds = predict(loaded, args.paths, topk=args.topk, fusion=args.fusion, workers=args.workers,
                    batch_size=args.batch_size or loaded.cfg.eval.batch_size or loaded.cfg.train.batch_size)
    if not preds:
        raise FileNotFoundError(f"no image found in {', '.join(args.paths)}")
    failed = sum(p.error is not None for p in preds)
    if args.output:  # first: nothing computed is lost if printing fails
        print(f"wrote {write_predictions(args.output, preds)}")
    if args.output is None or len(preds) <= 100:
        print(predictions_table(preds))
    if failed == len(preds):
        raise ValueError(f"no input could be read: {failed} file(s) failed")
    print(f"{len(preds)} images, {failed} unreadable", file=sys.stderr)
    return preds


def _embed_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"fusion": args.fusion, "after_bn": args.after_bn, "flip": args.flip, "batch_size": args.batch_size,
            "workers": args.workers}


def _report_failed(features: Any) -> None:
    for path, err in features.failed.items():
        print(f"skipped {path}: {err}", file=sys.stderr)


def cmd_embed(args: argparse.Namespace) -> Any:
    from dcal.loading import load_model
    from dcal.retrieval import embed_images, is_features_file

    if not is_features_file(args.output):
        return _embed_shards(args)
    from dcal.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise ValueError("under torchrun --output must be a folder (a shard set the processes share)")
    feats = embed_images(load_model(args.run, args.checkpoint, args.device), args.paths, **_embed_kwargs(args))
    _report_failed(feats)
    path = feats.save(args.output)
    ids = "with pid/camid" if feats.has_ids else "without ids (names carry none)"
    print(f"wrote {path}: {len(feats)} features of dimension {feats.features.shape[1]}, {ids}")
    return feats


def _embed_shards(args: argparse.Namespace) -> Any:
    """``dcal embed --output FOLDER``: a resumable shard set; under torchrun each process embeds its shards."""
    from dcal import distributed as dist
    from dcal.gallery.shards import embed_shards, finish_shards, plan_shards, start_shards
    from dcal.loading import load_model

    info, device = dist.init(args.device or "auto")
    try:
        loaded = load_model(args.run, args.checkpoint, str(device))
        options = {k: v for k, v in _embed_kwargs(args).items() if k != "workers"}
        plan = plan_shards(loaded, args.paths, args.output, shard_size=args.shard_size, dtype=args.dtype, **options)
        resumed = dist.on_main(lambda: start_shards(plan))
        dist.barrier()
        error: BaseException | None = None
        try:
            record = embed_shards(loaded, plan, rank=info.rank, world_size=info.world_size, workers=args.workers)
        except BaseException as e:  # every process must reach the agreement below, or the others wait forever
            error, record = e, {}
        if not dist.all_agree(error is None, device):
            if error is not None:
                raise error
            raise RuntimeError("another process failed (its error is printed above); run the command again to "
                               "resume")
        totals = dist.all_reduce_sum([record["embedded"], len(record["skipped"])], device)
        shards = dist.on_main(lambda: finish_shards(plan.folder))
    finally:
        dist.shutdown(info)
    if info.is_main:
        rate = totals[0] / record["seconds"] if record["seconds"] > 0 else 0.0
        print(f"{'resumed; ' if resumed else ''}embedded {int(totals[0])} images now ({rate:.1f} images/s"
              f"{' on rank 0' if info.enabled else ''}), {int(totals[1])} unreadable skipped")
        print(f"wrote {plan.folder}: {len(shards)} features of dimension {shards.manifest['meta']['dim']} in "
              f"{shards.manifest['num_shards']} shards ({shards.manifest['dtype']}), {shards.manifest['failed']} "
              "images unreadable in all")
    return shards


def cmd_search(args: argparse.Namespace) -> Any:
    from dcal.loading import load_model
    from dcal.retrieval import check_compatible, features_of, is_features_file, rank_gallery, write_search

    loaded = load_model(args.run, args.checkpoint, args.device) if args.run or args.checkpoint else None
    sets = {}
    for k in ("query", "gallery"):
        sets[k] = features_of(getattr(args, k), loaded, f"--{k}", **_embed_kwargs(args))
        if not is_features_file(getattr(args, k)):  # a features file's skipped images were reported by dcal embed
            _report_failed(sets[k])
    query, gallery = sets["query"], sets["gallery"]
    check_compatible(query, gallery)
    if args.save_gallery:
        print(f"saved gallery features to {gallery.save(args.save_gallery)}")
    ranking = rank_gallery(query, gallery, topk=args.max_rank, metric=args.metric, rerank=args.rerank is not None,
                           rerank_method=args.rerank or "graph", chunk_size=args.chunk_size,
                           threshold=args.threshold)
    out = Path(args.output_dir)
    if not (ranking.order >= 0).any():
        raise ValueError(f"no query could be ranked: the protocol excludes every gallery image of --gallery "
                         f"{args.gallery} (junk pid -1, or the query's identity under the query's camera)")
    pics = write_search(out, query, gallery, ranking, None if args.num_vis < 0 else args.num_vis)
    print(f"{len(query)} queries x {len(gallery)} gallery images; ranking in {out / 'ranking.csv'}")
    if ranking.metrics is not None:
        if "error" in ranking.metrics:
            print(f"no evaluation: {ranking.metrics['error']}", file=sys.stderr)
        else:
            print_metrics(ranking.metrics)
    else:
        print("no evaluation: the file names of the query or gallery carry no pid/camid")
    if ranking.in_gallery is not None:
        away = int((~ranking.in_gallery).sum())
        print(f"{away} of {len(query)} queries not in the gallery (best match farther than {args.threshold:g})")
    if args.num_vis:
        print(f"{len(pics)} ranking pictures in {out / 'visrank'}")
    return ranking


def cmd_index(args: argparse.Namespace) -> Any:
    from dcal.checkpoint import json_text
    from dcal.gallery import index as gi

    gi.set_threads(args.threads if "threads" in args else None)
    action = args.index_command
    if action == "info":
        info = gi.GalleryIndex.open(args.index).info()
        print(json_text(info, indent=1).rstrip() if args.json else "\n".join(f"{k:>18}: {v}" for k, v in info.items()))
        return info
    if action == "remove":
        if not (args.path or args.pid):
            raise ValueError("give --path and/or --pid: what to remove")
        index, n = gi.remove_from_index(args.index, args.path, args.pid)
        print(f"removed {n} items from {args.index}: {len(index)} remain")
        return index
    from dcal.loading import load_model

    loaded = load_model(args.run, args.checkpoint, args.device) if args.run or args.checkpoint else None
    if action == "build":
        sources = [gi.open_source(s, loaded, **_embed_kwargs(args)) for s in args.sources]
        _report_failed_sources(sources)
        calibration = gi.open_source(args.calibrate_with, loaded, **_embed_kwargs(args)) \
            if args.calibrate_with else None
        index = gi.build_index(args.index, sources, args.type, backend=args.backend, metric=args.metric,
                               overwrite=args.overwrite, milvus_uri=args.milvus_uri, collection=args.collection,
                               calibration=calibration)
        calibrated = index.info().get("calibrated")
        print(f"built {args.index}: {len(index)} vectors, {index.manifest['index']} ({index.manifest['backend']})"
              f"{'; search default ' + calibrated if calibrated else ''}")
        return index
    if action == "add":
        held = set(gi.GalleryIndex.open(args.index).idmap.paths()) if loaded is not None else set()
        sources = [gi.open_source(s, loaded, skip_paths=held, **_embed_kwargs(args)) for s in args.sources]
        _report_failed_sources(sources)
        index, added, skipped = gi.add_to_index(args.index, sources)
        print(f"added {added} items to {args.index} ({skipped} already there skipped): {len(index)} in all")
        return index
    return _index_search(args, gi, loaded)


def _report_failed_sources(sources: Any) -> None:
    for s in sources:
        for path, err in s.failed.items():
            print(f"skipped {path}: {err}", file=sys.stderr)


def _index_search(args: argparse.Namespace, gi: Any, loaded: Any) -> Any:
    import torch

    from dcal.retrieval import FeatureSet

    params = {k: v for k, v in (("nprobe", args.nprobe), ("efSearch", args.ef_search)) if v is not None}
    index = gi.GalleryIndex.open(args.index, search_params=params)
    source = gi.open_source(args.query, loaded, **_embed_kwargs(args))
    _report_failed_sources([source])
    parts = list(source.chunks())
    query = FeatureSet(torch.cat([p.features.float() for p in parts]), sum((p.paths for p in parts), []),
                       None, None, source.meta)
    if all(p.has_ids for p in parts):
        query.pids, query.camids = sum((p.pids for p in parts), []), sum((p.camids for p in parts), [])
    gi.check_features(index.manifest["features"], query.meta, f"--query {args.query}", index.folder)
    cameras = [int(c) - 1 for c in args.cameras.split(",") if c.strip()] if args.cameras else None
    frames = None
    if args.frames:
        first, sep, last = args.frames.partition(":")
        if not sep or not first.strip().lstrip("-").isdigit() or not last.strip().lstrip("-").isdigit():
            raise ValueError(f"--frames {args.frames!r}: expected FIRST:LAST, two integers")
        frames = (int(first), int(last))
    result = index.search(query.features, args.topk, query_pids=query.pids, query_camids=query.camids,
                          protocol=not args.no_protocol, cameras=cameras, frames=frames,
                          metric=args.metric or index.manifest["metric"])
    out = Path(args.output_dir)
    pics = gi.write_index_search(out, query, index, result, None if args.num_vis < 0 else args.num_vis)
    found = int((result.rows >= 0).any(1).sum())
    print(f"{len(query)} queries against {len(index)} gallery items ({found} with a result); ranking in "
          f"{out / 'ranking.csv'}" + (f", {len(pics)} pictures in {out / 'visrank'}" if args.num_vis else ""))
    return result


def cmd_export(args: argparse.Namespace) -> Any:
    import torch

    from dcal.loading import load_model

    if not (args.onnx or args.safetensors):
        raise ValueError("give --onnx FILE and/or --safetensors FILE")
    loaded = load_model(args.run, args.checkpoint, "cpu")
    if args.safetensors:
        from dcal.checkpoint import export_weights
        from dcal.config import to_yaml

        export_weights(args.safetensors, loaded.model, to_yaml(loaded.cfg),
                       {"classes": loaded.classes or loaded.model.cfg.num_classes})
        print(f"wrote {args.safetensors} (weights + config; load with dcal.load_model(checkpoint=...))")
    if args.onnx:
        from dcal.export import compare_with_onnxruntime, export_onnx, onnx_metadata

        path = export_onnx(loaded.model, args.onnx, fusion=args.fusion, after_bn=args.after_bn, opset=args.opset,
                           metadata=onnx_metadata(loaded, args.fusion, args.after_bn))
        print(f"wrote {path}")
        if not args.no_check:
            h, w = loaded.model.backbone.patch_embed.img_size
            res = compare_with_onnxruntime(loaded.model, path, torch.randn(3, 3, h, w), args.fusion, args.after_bn)
            print("onnxruntime vs PyTorch on a random batch of 3: " + ", ".join(f"{k} {v}" for k, v in res.items()))
    return loaded


def cmd_report(args: argparse.Namespace) -> Any:
    from dcal.report import write_report

    png, md = write_report(args.runs, args.output_dir)
    print(f"wrote {png} and {md}")
    return png, md


def cmd_recipes(args: argparse.Namespace) -> Any:
    import shutil

    from dcal.config import recipe_names, resolve_recipe

    if args.name is None:
        if args.copy:
            raise ValueError("--copy needs a recipe name: dcal recipes NAME --copy DIR")
        names = recipe_names()
        for name in names:
            first = resolve_recipe(name).read_text(encoding="utf-8").split("\n", 1)[0]
            print(f"{name:<34} {first.lstrip('# ') if first.startswith('#') else ''}".rstrip())
        return names
    path = resolve_recipe(args.name)
    if args.copy is None:
        print(path.read_text(encoding="utf-8"), end="")
        return path
    dest = Path(args.copy) / path.name
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(f"{dest} already exists{' (a link)' if dest.is_symlink() else ''}: not replaced "
                              "(remove it, or copy into another folder)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL | O_NOFOLLOW: a link or file that appears meanwhile is not written through or replaced
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    with os.fdopen(fd, "wb") as f, open(path, "rb") as src:
        shutil.copyfileobj(src, f)
    print(f"wrote {dest}: train with dcal train --config {dest} data.root=...")
    return dest


def cmd_complexity(args: argparse.Namespace) -> Any:
    from dcal.model.complexity import complexity_rows, format_table

    print("Inference cost (PWCA is training-only and adds nothing); FLOPs counted as multiply-accumulates.")
    rows = complexity_rows()
    print(format_table(rows))
    return rows


def cmd_ablation(args: argparse.Namespace) -> Any:
    from dcal.ablation import format_markdown, run_ablation

    sets = [s.strip() for s in args.set.split(",") if s.strip()]
    overrides = [*args.overrides, *([f"train.eval_every={args.eval_every}"] if args.eval_every else [])]
    only = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    summary = run_ablation(args.config, sets, args.seeds, overrides, args.output_dir, pretrain=args.pretrain,
                           only=only, max_seeds=args.max_seeds)
    print(format_markdown(summary))
    return summary


def _rank_tag() -> str:
    """`` (rank R)`` inside a torchrun process, so that its error lines say which process spoke."""
    from dcal.distributed import launched_by_torchrun

    return f" (rank {os.environ['RANK']})" if launched_by_torchrun() else ""


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "visualize": cmd_visualize,
            "complexity": cmd_complexity, "ablation": cmd_ablation, "predict": cmd_predict, "embed": cmd_embed,
            "search": cmd_search, "index": cmd_index, "export": cmd_export, "report": cmd_report,
            "recipes": cmd_recipes}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(getattr(args, "threads", None))
    configure_logging()
    from dcal.config import ConfigError
    from dcal.errors import error_line

    try:
        COMMANDS[args.command](args)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`dcal recipes | head -3`): end quietly, as Unix tools do on SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError, ImportError, OSError,
            RuntimeError) as e:
        # user errors (bad config, layout, paths, data, diverged run, a missing optional extra) and foreseeable
        # failures (full disk, read-only folder, a killed loader worker): one clear line; anything else is a bug
        line = error_line(e)
        if line is None:
            raise
        print(f"dcal {args.command}: error{_rank_tag()}: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # dcal.engine.run.TrainingInterrupted (SIGTERM/SIGINT in training) says where it stopped and what it
        # saved, and carries the shell's exit code (128 + signal); a plain Ctrl-C elsewhere is 130
        print(f"dcal {args.command}{_rank_tag()}: {getattr(e, 'message', 'interrupted')}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
