"""The `alldetect` command: parses arguments, then calls one function. No logic of its own."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _index(a):
    from alldetect.commands.data import index_command

    print(index_command(a.data_root))


def _split(a):
    from alldetect.commands.data import split_command

    print(split_command(a.data_root, a.k, a.seed, a.by, a.out, a.folds_dir, a.skip_bad))


def _demo_data(a):
    from alldetect.data.demo import make_demo_data

    out = make_demo_data(a.out, a.subjects, a.per_subject, a.seed, full_frame=a.full_frame)
    print(f"wrote {a.subjects * a.per_subject} synthetic images to {out} (see {out}/README.md)")


def _train(a):
    from alldetect.commands.train import train_command

    train_command(a.arch, a.fold, a.overrides, a.config)


def _pretrain(a):
    from alldetect.commands.pretrain import pretrain_command

    pretrain_command(a.arch, a.fold, a.overrides, a.config)


def _models(a):
    from alldetect.models.table import models_table

    print(models_table(a.names or None).to_string(index=False))


def _cache(a):
    from alldetect.commands.train import cache_command

    print(cache_command(a.arch, a.overrides, a.config))


def _bench(a):
    from alldetect.commands.bench import bench_command

    print(bench_command(a.kind, a.data, a.images, a.workers, a.archs, a.budget, a.max_batch, not a.no_compile, a.device,
                        a.out, a.cache_dir))


def _predict(a):
    from alldetect.commands.predict import predict_command

    predict_command(a.runs, a.data, a.name, a.overrides, oof=a.oof)


def _ensemble(a):
    from alldetect.commands.ensemble import ensemble_command

    ensemble_command(a.runs, a.oof, a.name, a.overrides, a.out)


def _evaluate(a):
    from alldetect.commands.evaluate import evaluate_command

    evaluate_command(a.submission, a.labels)


def _tune(a):
    from alldetect.commands.tune import tune_command

    tune_command(a.arch, a.overrides, a.config, trials=a.trials, folds=a.folds, study=a.study, storage=a.storage,
                 space=a.space, pruner=a.pruner, timeout=a.timeout, heartbeat=a.heartbeat, out=a.out)


def _report(a):
    from alldetect.commands.report import report_command

    report_command(a.runs, a.submissions, a.name, a.out, a.data, None if a.no_speed else a.device)


def _visualize(a):
    from alldetect.commands.visualize import visualize_command

    visualize_command(a.run, a.images, a.out, a.device, a.target, a.layer)


def _export(a):
    from alldetect.commands.export import export_command

    export_command(a.runs, a.out, a.format, a.overwrite)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alldetect", description="Acute lymphoblastic leukemia detection in "
                                "white-blood-cell images (C-NMC 2019).")
    p.add_argument("-v", "--verbose", action="store_true", help="show debug messages and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_data_commands, _train_commands, _prediction_commands, _tune_command, _look_commands):
        add(sub)
    return p


ARCH_HELP = "proposed, alexnet, vgg16, resnet50, inception_v3, or any timm model name"
RUNS_HELP = "runs/<arch> (all its folds) or runs/<arch>/fold<k>, and key=value options"


def _config_files(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", action="append", default=[], metavar="FILE", help="extra config file (repeatable)")


def _data_commands(sub) -> None:
    from alldetect.options import SPLIT_BY, meanings

    s = sub.add_parser("index", help="show what a data folder holds: layout, classes, subjects, image sizes")
    s.add_argument("data_root")
    s.set_defaults(func=_index)

    s = sub.add_parser("split", help="write a stratified, subject-grouped k-fold file to folds/")
    s.add_argument("data_root")
    s.add_argument("--k", type=int, default=5, help="number of folds (default 5)")
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--by", choices=list(SPLIT_BY), default="subject", help=meanings(SPLIT_BY))
    s.add_argument("--out", help="fold file to write (default folds/<dataset>_k<k>_s<seed>.csv)")
    s.add_argument("--folds-dir", default="folds")
    s.add_argument("--skip-bad", action="store_true", help="leave out unreadable images and list them")
    s.set_defaults(func=_split)

    s = sub.add_parser("demo-data", help="write the synthetic demo data set (C-NMC layout and names)")
    s.add_argument("out")
    s.add_argument("--subjects", type=int, default=24)
    s.add_argument("--per-subject", type=int, default=25)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--full-frame", action="store_true",
                   help="each cell on a smear of red cells instead of on black (images unlike C-NMC's)")
    s.set_defaults(func=_demo_data)

    s = sub.add_parser("cache", help="decode, crop and resize every image once for ARCH's input size (data.cache)")
    s.add_argument("arch")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. input_size=224")
    _config_files(s)
    s.set_defaults(func=_cache)


def _train_commands(sub) -> None:
    s = sub.add_parser("train", help="train ARCH on FOLD (fold0..fold<k-1>, all, or full: every image) into "
                       "runs/<arch>/fold<k> (or runs/<arch>/full)")
    s.add_argument("arch", help=ARCH_HELP)
    s.add_argument("fold", help="fold0, fold1, ..., all (every fold), or full (one final model on every image)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=3e-4 epochs=20")
    _config_files(s)
    s.set_defaults(func=_train)

    s = sub.add_parser("pretrain", help="self-supervised pretraining (SimCLR, no labels read) of ARCH's encoder "
                       "into pretrained/<arch>/<fold>/encoder.pth, for train ... pretrained_path=")
    s.add_argument("arch", help="a timm network, e.g. resnet18, efficientnet_lite0, resnet50")
    s.add_argument("fold", help="fold<k>: the images of every other fold (the honest start for fold k); each: every "
                   "fold in turn; all: every image, the scored people's too (transductive)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. input_size=96 epochs=10")
    _config_files(s)
    s.set_defaults(func=_pretrain)

    s = sub.add_parser("models", help="list the architectures with input sizes and parameter counts")
    s.add_argument("names", nargs="*", help="architectures to list (default: the report's five)")
    s.set_defaults(func=_models)

    s = sub.add_parser("bench", help="benchmarks: data pipeline or models, ratios measured side by side")
    s.add_argument("kind", choices=["pipeline", "models"])
    s.add_argument("archs", nargs="*", help="models: architectures (default: the report's five)")
    s.add_argument("--data", help="pipeline: data folder (default: the demo data)")
    s.add_argument("--images", type=int, default=320, help="pipeline: images to use")
    s.add_argument("--workers", type=int, default=2, help="pipeline: loader workers")
    s.add_argument("--cache-dir", default="data/cache", help="pipeline: where the decoded-image cache goes")
    s.add_argument("--budget", type=float, default=240.0,
                   help="models: seconds of compiled settings (compile, CUDA graphs): none is started after them")
    s.add_argument("--max-batch", type=int, help="models: cap on the batch size (default 1024 on CUDA, 8 on the CPU)")
    s.add_argument("--no-compile", action="store_true", help="models: leave torch.compile and CUDA graphs out")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", help="also append the table to this file")
    s.set_defaults(func=_bench)


def _prediction_commands(sub) -> None:
    from alldetect.options import ENSEMBLE_OPTIONS, PREDICT_OPTIONS, describe

    # key=value options (tta=d8, weights=oof, ...) may sit among the run folders; the command tells them apart.
    s = sub.add_parser("predict", help="run trained models over a folder of images: runs/<arch>/fold<k>/pred_<NAME>.csv",
                       epilog="options (key=value): " + describe(PREDICT_OPTIONS))
    s.add_argument("runs", nargs="+", metavar="RUN", help=RUNS_HELP)
    s.add_argument("--data", metavar="DIR", help="images in any layout alldetect reads (with --oof: where the "
                   "runs' data set is now, if it moved)")
    s.add_argument("--name", help="name of this prediction set, e.g. prelim (pred_<NAME>.csv)")
    s.add_argument("--oof", action="store_true", help="each fold run predicts its own validation images again "
                   "(pred_oof.csv; with features=true, feat_oof.npz for ensemble --oof correct=knn)")
    s.set_defaults(func=_predict, overrides=[])

    s = sub.add_parser("ensemble", help="average runs' softmax outputs: score OOF (--oof) or write a submission (--name)",
                       epilog="options (key=value), each fitted on out-of-fold predictions: "
                              + describe(ENSEMBLE_OPTIONS))
    s.add_argument("runs", nargs="+", metavar="RUN", help=RUNS_HELP)
    s.add_argument("--oof", action="store_true", help="score the out-of-fold predictions of members and ensemble")
    s.add_argument("--name", help="combine the predictions `predict --name NAME` made into submissions/<NAME>.csv "
                   "(with --oof: names the output folder, submissions/oof_<NAME>/)")
    s.add_argument("--out", default="submissions", help="output folder (default submissions)")
    s.set_defaults(func=_ensemble, overrides=[])

    s = sub.add_parser("evaluate", help="score a submission CSV against a C-NMC labels file")
    s.add_argument("submission", help="submissions/<NAME>.csv")
    s.add_argument("--labels", required=True, help="C-NMC_test_prelim_phase_data_labels.csv (Patient_ID,new_names,labels)")
    s.set_defaults(func=_evaluate)


def _tune_command(sub) -> None:
    from alldetect.options import PRUNERS

    s = sub.add_parser("tune", help="Optuna study of ARCH's hyperparameters; writes configs/tuned/<arch>.yaml")
    s.add_argument("arch", help=ARCH_HELP)
    s.add_argument("overrides", nargs="*", metavar="key=value", help="fixed config overrides, e.g. epochs=20")
    s.add_argument("--trials", type=int, default=20, help="trials this run adds to the study (default 20)")
    s.add_argument("--folds", default="fold0", help="validation folds, scored as their mean: fold0 (default), "
                                                    "fold0,fold1,... or all")
    s.add_argument("--study", help="study name (default ARCH; ARCH-demo on the built-in demo data)")
    s.add_argument("--storage", metavar="URL", help="Optuna storage (default sqlite:///studies/<study>.db); "
                                                    "postgresql://USER:PASSWORD@HOST/DB shares a study among workers")
    s.add_argument("--space", metavar="FILE", help="search space (default configs/search/<arch>.yaml, "
                                                   "else configs/search/default.yaml)")
    s.add_argument("--pruner", choices=PRUNERS, default=PRUNERS[0],
                   help=f"stops unpromising trials early (default {PRUNERS[0]})")
    s.add_argument("--timeout", type=float, metavar="SECONDS", help="start no new trial after this long")
    s.add_argument("--heartbeat", type=int, default=60, metavar="SECONDS",
                   help="a worker's running trial is marked failed 2 heartbeats after it stops (default 60)")
    s.add_argument("--out", metavar="FILE", help="tuned config to write (default configs/tuned/<arch>.yaml)")
    _config_files(s)
    s.set_defaults(func=_tune)


def _look_commands(sub) -> None:
    from alldetect.options import EXPORT_FORMATS, GRADCAM_TARGETS, meanings

    s = sub.add_parser("report", help="the comparison table, curves and mistakes of every run: reports/<NAME>/index.html")
    s.add_argument("--runs", default="runs", help="folder of <arch>/fold<k>/ runs (default runs)")
    s.add_argument("--submissions", default="submissions", help="where `ensemble --oof` wrote oof_*/ (default submissions)")
    s.add_argument("--name", help="report name (default: the architectures joined by +)")
    s.add_argument("--out", default="reports", help="output folder (default reports)")
    s.add_argument("--data", metavar="DIR", help="data root of the images, when the runs' recorded one has moved")
    s.add_argument("--device", default="auto", help="where to time inference: auto, cpu, cuda (default auto)")
    s.add_argument("--no-speed", action="store_true", help="do not time inference (images/s: not measured)")
    s.set_defaults(func=_report)

    s = sub.add_parser("visualize", help="feature maps of every convolution block and Grad-CAM, per image")
    s.add_argument("run", metavar="RUN", help="runs/<arch>/fold<k> (runs/<arch>: its first fold)")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.add_argument("--out", default="reports/visualize", help="output folder (default reports/visualize)")
    s.add_argument("--target", choices=list(GRADCAM_TARGETS), default="pred",
                   help="class whose Grad-CAM is drawn: " + meanings(GRADCAM_TARGETS))
    s.add_argument("--layer", metavar="NAME", help="module for Grad-CAM, e.g. layer4 (default: the last block whose "
                   "map is at least 7 x 7)")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    s.set_defaults(func=_visualize)

    s = sub.add_parser("export", help="a fold's model as ONNX (or TorchScript) with its preprocessing, to run "
                       "without alldetect: exports/<arch>_fold<k>/")
    s.add_argument("runs", nargs="+", metavar="RUN", help="runs/<arch> (every fold) or runs/<arch>/fold<k>")
    s.add_argument("--format", default=EXPORT_FORMATS[0], help=f"{', '.join(EXPORT_FORMATS)}, or several "
                   f"comma-separated: {','.join(EXPORT_FORMATS)} (default {EXPORT_FORMATS[0]})")
    s.add_argument("--out", default="exports", help="output folder (default exports)")
    s.add_argument("--overwrite", action="store_true", help="replace the export of another run in the same folder "
                   "(an export of the same run is always replaced)")
    s.set_defaults(func=_export)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after --config FILE: collect the ones argparse leaves over.
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _configure_logging(args.verbose)
    from alldetect.engine.stopping import StopRequested
    from alldetect.errors import UserError

    try:
        args.func(args)
    except UserError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StopRequested as e:
        print(str(e), file=sys.stderr)
        return 143  # 128 + SIGTERM, as schedulers expect of a job that was asked to stop
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `alldetect ... | head` closed the pipe: stop quietly, as other CLI tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # a file or folder that cannot be read or written, where no check caught it first
        if args.verbose:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; run with -v for the full traceback", file=sys.stderr)
        return 2
    return 0


def _configure_logging(verbose: bool) -> None:
    class Prefix(logging.Formatter):
        def format(self, record):
            msg = super().format(record)
            return f"warning: {msg}" if record.levelno >= logging.WARNING else msg

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Prefix("%(message)s"))
    logger = logging.getLogger("alldetect")
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


if __name__ == "__main__":
    raise SystemExit(main())
