"""GLUE SST-2: the data set the data stage downloads (checksummed) when it is given no data directory."""
import re
import shutil
import zipfile
from pathlib import Path

from pipeline.core.download import fetch
from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_path

# GLUE SST-2. Checksum and size from tensorflow/datasets, tensorflow_datasets/url_checksums/glue.txt
# (SST-2.zip, 7439277 bytes); the same values are listed for this address in the Hugging Face
# datasets-server docs ("download_checksums" of glue/sst2).
SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
SST2_SHA256 = "d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa"
SST2_KEEP = ("train.tsv", "dev.tsv")  # GLUE's test.tsv has no labels


def safe_extract(zip_path, dest, keep=None) -> Path:
    """Extract a zip's files by base name into `dest` (atomically), refusing the whole archive if
    any member path would resolve outside it. keep: optional set of member names to extract."""
    zip_path, dest = Path(zip_path), Path(dest)
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise PipelineError(f"{zip_path}: not a zip file") from None
    with zf, atomic_path(dest) as tmp:
        root = tmp.resolve()
        # Check every member before writing anything: one escaping path means a hostile archive.
        for info in zf.infolist():
            target = (root / info.filename).resolve()
            if info.filename.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", info.filename) \
                    or not target.is_relative_to(root):
                raise PipelineError(f"{zip_path.name}: member '{info.filename}' would be written outside "
                                    f"{dest}; refusing to extract")
        tmp.mkdir()
        for info in zf.infolist():
            if info.is_dir() or (keep is not None and info.filename not in keep):
                continue
            with zf.open(info) as src, open(tmp / Path(info.filename).name, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


def download_sst2(raw_dir, url=SST2_URL, sha256=SST2_SHA256) -> Path:
    """Fetch GLUE SST-2 into raw_dir/SST-2 (train.tsv, dev.tsv) and return that directory."""
    raw_dir = Path(raw_dir)
    target = raw_dir / "SST-2"
    if all((target / n).is_file() for n in SST2_KEEP):
        return target
    zip_path = fetch(url, raw_dir / "SST-2.zip", sha256,
                     hint=f"save it by hand as {raw_dir / 'SST-2.zip'}, or pass --data DIR")
    safe_extract(zip_path, target, keep={f"SST-2/{n}" for n in SST2_KEEP})
    missing = [n for n in SST2_KEEP if not (target / n).is_file()]
    if missing:
        shutil.rmtree(target, ignore_errors=True)  # so the next run does not take it as done
        raise PipelineError(f"{zip_path}: no {', '.join(missing)} in the archive")
    return target
