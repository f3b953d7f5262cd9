"""manifest.json of a run directory: the SHA-256 of every artifact, and the config and input checksums
each stage made them from. Stages skip work whose inputs are unchanged, and every reader refuses a
file that no longer matches its checksum (truncated, altered, or left over from an unfinished run).

    {"stages": {"train": {"config": {...}, "inputs": {"train.tfrecord": "<sha256>", ...},
                          "artifacts": ["model.keras", ...]}},
     "artifacts": {"model.keras": {"sha256": "...", "bytes": 5081026, "stage": "train"}}}
"""
import hashlib
import json
import shutil
from pathlib import Path

from pipeline.core import files
from pipeline.core.errors import PipelineError

NAME = "manifest.json"
COMMANDS = {"data": "make data", "pretrain": "make pretrain", "train": "make train", "distill": "make distill",
            "compress": "make compress",
            "benchmark": "make benchmark", "report": "make report", "search": "make search"}


def sha256(path) -> str:
    """SHA-256 of a file, or of a directory tree (every file's relative path and content, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(p.relative_to(path).as_posix().encode() + b"\0" + sha256(p).encode() + b"\n")
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _size(path):
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def load(run_dir) -> dict:
    path = Path(run_dir) / NAME
    if not path.exists():
        return {"stages": {}, "artifacts": {}}
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(m.get("stages"), dict) or not isinstance(m.get("artifacts"), dict):
            raise ValueError("missing 'stages' or 'artifacts'")
    except (ValueError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: unreadable manifest ({e}); delete {run_dir} and run the stages again") from None
    return m


def verify(run_dir, name, m=None) -> str:
    """Check artifact `name` of `run_dir` against the manifest (`m`, read here if not given); return its SHA-256."""
    run_dir = Path(run_dir)
    path = run_dir / name
    entry = (m or load(run_dir))["artifacts"].get(name)
    if entry is None:
        raise PipelineError(f"{path}: not listed in {run_dir / NAME}, so no finished stage wrote it; run the "
                            f"stage that makes it (`make data`, `make train` or `make compress`) again")
    fix = f"delete it and run `{COMMANDS.get(entry['stage'], entry['stage'])}` again"
    if not path.exists():
        raise PipelineError(f"{path}: missing (the {entry['stage']} stage wrote it); {fix}")
    digest = sha256(path)
    if digest != entry["sha256"]:
        size = _size(path)
        what = "truncated" if size < entry["bytes"] else "altered"
        raise PipelineError(f"{path}: {what} since the {entry['stage']} stage wrote it ({size:,} bytes, "
                            f"SHA-256 {digest[:12]}… instead of {entry['bytes']:,} bytes, {entry['sha256'][:12]}…); {fix}")
    return digest


MODEL_FILES = ("model.keras", "vocab.txt", "labels.txt", "preprocess.json")  # what a predictor reads


def verify_if_listed(path):
    """Verify a trained model directory or .tflite file named by the user, when a manifest lists it
    (a model directory's own, or the run directory's for tflite/*.tflite); other files are taken as is."""
    path = Path(path).resolve()
    if path.is_dir():
        targets = [(path, name) for name in MODEL_FILES]
    else:
        targets = [(d, path.relative_to(d).as_posix()) for d in (path.parent, path.parent.parent)]
    for run_dir, name in targets:
        if (run_dir / NAME).exists() and name in load(run_dir)["artifacts"]:
            verify(run_dir, name)


def inputs(run_dir, names, label) -> dict:
    """{"label/name": sha256} of artifacts of `run_dir`, each verified against its manifest."""
    m = load(run_dir)
    return {f"{label}/{n}": verify(run_dir, n, m) for n in names}


def files_checksums(paths) -> dict:
    """{file name: sha256} of input files that no stage made (the user's data)."""
    return {Path(p).name: sha256(p) for p in paths}


def _changes(old, new):
    """The config keys and inputs that differ, for a one-line 'why rerun' message."""
    out = []
    for section in sorted(set(old["config"]) | set(new["config"])):
        a, b = old["config"].get(section, {}), new["config"].get(section, {})
        out += [f"{section}.{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    out += [f"{Path(k).name} changed" for k in sorted(set(old["inputs"]) | set(new["inputs"]))
            if old["inputs"].get(k) != new["inputs"].get(k)]
    return out


def up_to_date(run_dir, stage, key) -> bool:
    """True when `stage` already finished from the same config and inputs (key = {"config", "inputs"})
    and its artifacts are intact; raises when one was altered; False (and says why) otherwise."""
    record = load(run_dir)["stages"].get(stage)
    if record is None:
        return False
    changes = _changes(record, key)
    if changes:
        print(f"{stage}: out of date ({'; '.join(changes[:5])}{'; …' if len(changes) > 5 else ''}); running it again")
        return False
    missing = [n for n in record["artifacts"] if not (Path(run_dir) / n).exists()]
    if missing:
        print(f"{stage}: {', '.join(missing)} deleted; running it again")
        return False
    m = load(run_dir)
    for name in record["artifacts"]:
        verify(run_dir, name, m)
    print(f"{stage}: up to date ({Path(run_dir) / NAME}); delete an output to redo it")
    return True


def version_config(stage, version) -> dict:
    """The config section a stage's key carries for its code version: a bumped version reruns the stage."""
    return {f"{stage}_stage": {"version": version}}


def stage_version(run_dir, stage):
    """The code version that made `stage`'s record (what version_config put in its key), or None."""
    record = load(run_dir)["stages"].get(stage, {})
    return record.get("config", {}).get(f"{stage}_stage", {}).get("version")


def _write(run_dir, m):
    files.write_json(Path(run_dir) / NAME, m)


def begin(run_dir, stage):
    """Forget `stage` before it (re)writes its artifacts: an interrupted run leaves nothing listed."""
    m = load(run_dir)
    if stage in m["stages"] or any(e["stage"] == stage for e in m["artifacts"].values()):
        m["stages"].pop(stage, None)
        m["artifacts"] = {n: e for n, e in m["artifacts"].items() if e["stage"] != stage}
        _write(run_dir, m)


def record(run_dir, stage, key, artifacts):
    """List the finished `stage`: its key and the checksum of each artifact (paths relative to run_dir)."""
    m = load(run_dir)
    for name in artifacts:
        path = Path(run_dir) / name
        m["artifacts"][name] = {"sha256": sha256(path), "bytes": _size(path), "stage": stage}
    m["stages"][stage] = {**key, "artifacts": list(artifacts)}
    _write(run_dir, m)


def work_dir(state, key, resumable=lambda d: True) -> bool:
    """A stage's working directory `state`, kept for a resume when an interrupted run of the same stage
    key left it (and `resumable(state)`); otherwise emptied and stamped with `key`. True when kept."""
    key_text = json.dumps(key, sort_keys=True)
    stamp = Path(state) / "key.json"
    if stamp.is_file() and stamp.read_text() == key_text and resumable(Path(state)):
        return True
    shutil.rmtree(state, ignore_errors=True)
    Path(state).mkdir(parents=True)
    files.write_text(stamp, key_text)
    return False
