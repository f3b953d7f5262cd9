"""The one CLI: `python -m pipeline <stage>` (also installed as `liteformer`)."""
import argparse
import contextlib
import importlib
import os
import sys
import warnings
from pathlib import Path

import pipeline  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.files import write_text
from pipeline.text.read import read_texts

DEFAULT_RUN = "SST-2"  # the run name of the GLUE SST-2 download
CURRENT_RUN = ".current_run"  # in paths.models: the run of the last data or train stage given --data or --run


def _common(p):
    p.add_argument("--config", default="params.yaml", help="config file (default: params.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks and the libraries' own log lines")


def resolve_run(args, cfg):
    """(run name, where it came from): --run, else the data stage's --data directory name, else the run
    remembered in paths.models/.current_run, else SST-2."""
    if args.run:
        return args.run, "given with --run"
    if args.stage == "data" and args.data:
        return Path(args.data).resolve().name, "the name of --data's directory"
    path = Path(cfg.paths.models) / CURRENT_RUN
    if path.is_file():
        run = path.read_text(encoding="utf-8").strip()
        if not run or "/" in run or "\\" in run or run in (".", ".."):
            raise PipelineError(f"{path}:1: not a run name ({run!r}); delete it, or choose with --run NAME")
        return run, "remembered from the last data/train given DATA or RUN; RUN=NAME or --run NAME to choose"
    return DEFAULT_RUN, "the default: GLUE SST-2, downloaded; DATA=DIR or --data DIR for your own data"


def remember_run(cfg, run):
    """Make `run` the one later stages without --run work on."""
    write_text(Path(cfg.paths.models) / CURRENT_RUN, run + "\n")


@contextlib.contextmanager
def _quiet_libraries():
    """Only the project's own lines on stderr: what C++ libraries write to fd 2 (TensorFlow's start-up lines,
    before TF_CPP_MIN_LOG_LEVEL applies; converter and TFLite INFO lines) goes to /dev/null, and library
    warnings are off, while sys.stderr keeps writing to the real stderr. --debug skips this."""
    sys.stderr.flush()
    real = os.dup(2)
    keep = sys.stderr
    try:
        if _fileno(sys.stderr) == 2:  # else (pytest's capture) sys.stderr does not write to fd 2 anyway
            sys.stderr = open(real, "w", buffering=1, encoding=keep.encoding, errors="backslashreplace",
                              closefd=False)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tensorflow as tf  # here, inside the silenced stderr: its start-up lines are what this hides

            tf.get_logger().setLevel("ERROR")  # its Python warnings (e.g. slow callbacks) too
            yield
    finally:
        if sys.stderr is not keep:
            sys.stderr.close()
            sys.stderr = keep
        os.dup2(real, 2)
        os.close(real)


def _fileno(stream):
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


RUN_HELP = f"run name (default: the run of the last data/train given --data or --run, else {DEFAULT_RUN})"


def build_parser():
    """The CLI's parser: a subcommand per stage, in the order of the README's table."""
    parser = argparse.ArgumentParser(prog="liteformer", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("data", help="read, validate, split and tokenize a data set")
    p.add_argument("--data", help="directory with train.* (and dev.*, test.*); default: the one the run was made "
                   "from, else download GLUE SST-2")
    p.add_argument("--run", help="run name (default: the data directory's name)")
    _common(p)

    p = sub.add_parser("pretrain", help="pretrain the encoder as a masked language model on the run's texts")
    p.add_argument("--run", default=None, help=RUN_HELP)
    _common(p)

    p = sub.add_parser("train", help="train the Transformer classifier on a processed run")
    p.add_argument("--run", default=None, help=RUN_HELP)
    _common(p)

    _add_model_commands(sub)

    for name, what in (("distill", "train a smaller student on the trained model's soft labels"),
                       ("compress", "prune, quantize and export TFLite variants"),
                       ("benchmark", "measure latency, memory and size of every variant"),
                       ("report", "write the comparison report"),
                       ("search", "search model shape, learning rate, dropout and int8 knobs (Optuna): Pareto front "
                                  "of dev macro F1 and int8 cost")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--run", default=None, help=RUN_HELP)
        _common(p)
    return parser


def _add_model_commands(sub):
    """The subcommands that take a model: evaluate, predict, explain and generate."""
    p = sub.add_parser("evaluate", help="evaluate a model directory or .tflite file on a data file")
    p.add_argument("--model", help="trained model directory or .tflite file (default: the run's model, on its "
                   "dev split, with --out saved_models/<run>/eval)")
    p.add_argument("--run", default=None, help=RUN_HELP + "; without --model")
    p.add_argument("--data", help="data file (.tsv, .csv or .jsonl) with text and label (default without --model: "
                   "the run's dev split)")
    p.add_argument("--out", help="also write metrics.json and PNG plots here, and log them to TensorBoard")
    _common(p)

    p = sub.add_parser("predict", help="classify texts; one JSON line per text")
    p.add_argument("--model", required=True, help="trained model directory or .tflite file")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--file", metavar="F", help="also classify the texts of F: one per line for a .txt file or - "
                   "(stdin), else the text column of a .tsv, .csv or .jsonl")
    p.add_argument("--runtime", choices=("litert", "mediapipe"), default="litert",
                   help="how to run a .tflite: LiteRT (default) or MediaPipe Tasks TextClassifier, as apps do")
    p.add_argument("--table", action="store_true", help="print an aligned table (text, label, probability) "
                   "instead of JSON lines")
    _common(p)

    p = sub.add_parser("explain", help="token attributions and attention maps of texts; one JSON line per text")
    p.add_argument("--model", required=True, help="trained model directory, or a .tflite file (explained through "
                   "the Keras model it was exported from)")
    p.add_argument("texts", nargs="*", help="texts to explain")
    p.add_argument("--file", metavar="F", help="also explain the texts of F (as predict --file)")
    p.add_argument("--class", dest="label", metavar="LABEL", help="explain this class (default: the predicted one)")
    p.add_argument("--steps", type=int, default=50, help="integrated-gradients steps (default: 50)")
    p.add_argument("--out", metavar="DIR", help="also write DIR/explain.html (self-contained), "
                   "explanations.jsonl and attention/*.png (a heatmap per text and block)")
    _common(p)

    p = sub.add_parser("generate", help="continue a prompt with a language model (data.task lm)")
    p.add_argument("--model", required=True, help="language model directory or .tflite file")
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (default: 0, all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's probability mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: none)")
    p.add_argument("--stop", default=None, help="stop before this string")
    _common(p)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage in ("predict", "explain") and not args.texts and args.file is None:
        parser.error(f"{args.stage}: give texts to {'classify' if args.stage == 'predict' else 'explain'}, or --file F")
    if args.stage == "explain" and args.steps < 1:
        parser.error(f"explain: --steps must be at least 1, got {args.steps}")
    if args.stage == "evaluate" and args.model and (args.run or not args.data):
        parser.error("evaluate: give --model with --data FILE, or a run (--run, or the remembered one) without --model")
    if args.debug:
        return run_stage(args)
    with _quiet_libraries():
        return run_stage(args)


def run_stage(args):
    """Run the stage `args` names; print a one-line error and return 2 for bad input."""
    try:
        call_stage(args)
    except PipelineError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk, a read-only directory: the file and the reason, nothing half-written
        problem = _write_problem(e)
        if problem is None or args.debug:
            raise
        print(f"error: {problem}; nothing was replaced (free space or fix the permissions, then run again)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _write_problem(e):
    """The file and reason of an OSError or of a TensorFlow file writer's error; None for any other exception."""
    tf = sys.modules.get("tensorflow")
    if isinstance(e, OSError):
        return f"{e.filename}: {e.strerror or e}" if e.filename else str(e)
    if tf is not None and isinstance(e, tf.errors.OpError):  # TensorFlow's file writers report these
        return e.message.strip().splitlines()[0]
    return None


# The module of pipeline/stages/ that runs each CLI stage.
STAGE_MODULES = {"data": "data", "pretrain": "pretrain", "train": "train", "evaluate": "evaluate",
                 "predict": "evaluate", "explain": "explain", "distill": "distill", "compress": "compress",
                 "benchmark": "benchmark", "report": "report", "generate": "generate",
                 "search": "search"}


def stage_module(stage):
    """pipeline.stages.<module> of `stage`, imported only when it runs: stage modules import TensorFlow, and
    importing every stage's libraries would slow each command down."""
    return importlib.import_module(f"pipeline.stages.{STAGE_MODULES[stage]}")


def call_stage(args):
    """Load the config, say which run, and call the stage's function with what the command line gives it."""
    config_path = args.config if (args.config != "params.yaml" or os.path.exists(args.config)) else None
    cfg = load_config(config_path, args.set)
    run = None
    if args.stage not in ("predict", "explain", "generate") and not (args.stage == "evaluate" and args.model):
        run, origin = resolve_run(args, cfg)
        # stdout holds evaluate's JSON result
        print(f"run: {run} ({origin})", file=sys.stderr if args.stage == "evaluate" else sys.stdout, flush=True)
    stage = stage_module(args.stage)
    if args.stage == "data":
        stage.run_data_stage(cfg, args.data, run)
        if args.data or args.run:
            remember_run(cfg, run)
    elif args.stage == "train":
        # None: a non-chief worker of several, which writes nothing of the run
        if stage.run_train_stage(cfg, run) is not None and args.run:
            remember_run(cfg, run)
    elif args.stage == "evaluate" and args.model:
        stage.run_evaluate(cfg, args.model, args.data, args.out)
    elif args.stage == "evaluate":
        model_dir = Path(cfg.paths.models) / run
        processed = Path(cfg.paths.data) / "processed" / run
        dev = processed / ("dev.txt" if (processed / "dev.txt").is_file() else "dev.jsonl")  # .txt: a language model
        stage.run_evaluate(cfg, str(model_dir), args.data or str(dev), args.out or str(model_dir / "eval"))
    elif args.stage == "predict":
        stage.run_predict(cfg, args.model, _texts(args, cfg), args.runtime, args.table)
    elif args.stage == "generate":
        stage.run_generate(args.model, args.prompt, args.max_tokens, args.temperature, args.top_k, args.top_p,
                           args.seed, args.stop)
    elif args.stage == "explain":
        stage.run_explain(cfg, args.model, _texts(args, cfg), args.out, args.label, args.steps)
    else:  # pretrain, distill, compress, benchmark, report, search
        getattr(stage, f"run_{args.stage}_stage")(cfg, run)


def _texts(args, cfg):
    """The texts given on the command line, then those of --file."""
    return list(args.texts) + (read_texts(args.file, cfg.data) if args.file is not None else [])


if __name__ == "__main__":
    sys.exit(main())
