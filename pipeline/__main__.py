"""The one CLI: `python -m pipeline <stage>` (also installed as `liteformer`)."""
import argparse
import os
import sys
from pathlib import Path

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
from pipeline.errors import PipelineError

DEFAULT_RUN = "SST-2"  # the run name of the GLUE SST-2 download


def _common(p):
    p.add_argument("--config", default="params.yaml", help="config file (default: params.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")


def _run_name(args):
    if getattr(args, "run", None):
        return args.run
    if getattr(args, "data", None):
        return Path(args.data).resolve().name
    return DEFAULT_RUN


def build_parser():
    parser = argparse.ArgumentParser(prog="liteformer", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("data", help="read, validate, split and tokenize a data set")
    p.add_argument("--data", help="directory with train.* (and dev.*, test.*); default: download GLUE SST-2")
    p.add_argument("--run", help="run name (default: the data directory's name)")
    _common(p)

    p = sub.add_parser("pretrain", help="pretrain the encoder as a masked language model on the run's texts")
    p.add_argument("--run", default=None, help=f"run name (default: {DEFAULT_RUN})")
    _common(p)

    p = sub.add_parser("train", help="train the Transformer classifier on a processed run")
    p.add_argument("--run", default=None, help=f"run name (default: {DEFAULT_RUN})")
    _common(p)

    p = sub.add_parser("evaluate", help="evaluate a model directory or .tflite file on a data file")
    p.add_argument("--model", required=True, help="trained model directory or .tflite file")
    p.add_argument("--data", required=True, help="data file (.tsv, .csv or .jsonl) with text and label")
    p.add_argument("--out", help="also write metrics.json and PNG plots here, and log them to TensorBoard")
    _common(p)

    p = sub.add_parser("predict", help="classify texts; one JSON line per text")
    p.add_argument("--model", required=True, help="trained model directory or .tflite file")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--file", metavar="F", help="also classify the texts of F: one per line for a .txt file or - "
                   "(stdin), else the text column of a .tsv, .csv or .jsonl")
    p.add_argument("--runtime", choices=("litert", "mediapipe"), default="litert",
                   help="how to run a .tflite: LiteRT (default) or MediaPipe Tasks TextClassifier, as apps do")
    _common(p)

    for name, what in (("distill", "train a smaller student on the trained model's soft labels"),
                       ("compress", "prune, quantize and export TFLite variants"),
                       ("benchmark", "measure latency, memory and size of every variant"),
                       ("report", "write the comparison report")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--run", default=None)
        _common(p)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage == "predict" and not args.texts and args.file is None:
        parser.error("predict: give texts to classify, or --file F")
    try:
        from pipeline.config import load_config

        config_path = args.config if (args.config != "params.yaml" or os.path.exists(args.config)) else None
        cfg = load_config(config_path, args.set)
        run = _run_name(args)
        if args.stage == "data":
            from pipeline.data import run_data_stage

            run_data_stage(cfg, args.data, run)
        elif args.stage == "pretrain":
            from pipeline.pretrain import run_pretrain_stage

            run_pretrain_stage(cfg, run)
        elif args.stage == "train":
            from pipeline.train import run_train_stage

            run_train_stage(cfg, run)
        elif args.stage == "evaluate":
            from pipeline.evaluate import run_evaluate

            run_evaluate(cfg, args.model, args.data, args.out)
        elif args.stage == "predict":
            from pipeline.data import read_texts
            from pipeline.evaluate import run_predict

            texts = list(args.texts) + (read_texts(args.file, cfg.data) if args.file is not None else [])
            run_predict(cfg, args.model, texts, args.runtime)
        elif args.stage == "distill":
            from pipeline.distill import run_distill_stage

            run_distill_stage(cfg, run)
        elif args.stage == "compress":
            from pipeline.compress import run_compress_stage

            run_compress_stage(cfg, run)
        elif args.stage == "benchmark":
            from pipeline.benchmark import run_benchmark_stage

            run_benchmark_stage(cfg, run)
        else:
            from pipeline.report import run_report_stage

            run_report_stage(cfg, run)
    except PipelineError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk, a read-only directory: the file and the reason, nothing half-written
        tf = sys.modules.get("tensorflow")
        if isinstance(e, OSError):
            problem = f"{e.filename}: {e.strerror or e}" if e.filename else str(e)
        elif tf is not None and isinstance(e, tf.errors.OpError):  # TensorFlow's file writers report these
            problem = e.message.strip().splitlines()[0]
        else:
            raise
        if args.debug:
            raise
        print(f"error: {problem}; nothing was replaced (free space or fix the permissions, then run again)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
