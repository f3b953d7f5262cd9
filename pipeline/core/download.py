"""Checksummed downloads: the file lands at its final path complete and verified, or not at all."""
import hashlib
import sys
import urllib.request
from pathlib import Path

from pipeline.core import manifest
from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_path


def fetch(url, dest, sha256, hint=None) -> Path:
    """Download `url` to `dest` (via a temp file, then rename) and verify its SHA-256; skip if present.
    hint: what the user can do instead, said when the download fails (default: save the file by hand)."""
    dest = Path(dest)
    if dest.is_file() and manifest.sha256(dest) == sha256:
        return dest
    print(f"downloading {url}", file=sys.stderr)
    with atomic_path(dest) as tmp:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        except OSError as e:  # URLError, HTTPError and socket errors are all OSErrors
            raise PipelineError(f"could not download {url}: {getattr(e, 'reason', e)} "
                                f"({hint or f'save it by hand as {dest}'})") from None
        if digest.hexdigest() != sha256:
            raise PipelineError(f"{url}: SHA-256 mismatch (expected {sha256}, got {digest.hexdigest()}); "
                                "the download is corrupt or the file changed")
    return dest
