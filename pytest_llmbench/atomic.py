"""Writing an output file atomically: a reader sees the old file or the new one, never half.

Used for the JSON and HTML reports. The file gets the mode a plain ``open(path, "w")``
would give it (0666 less the umask), not ``mkstemp``'s private 0600: a report is meant to
be read by others (a CI artifact, a web server).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomically(path: Path, text: str, option: str) -> None:
    """Write ``text`` to ``path`` (parents created); ConfigError names ``option`` on failure."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # same directory, so that os.replace is a rename within one filesystem
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if hasattr(os, "fchmod"):  # not on Windows, where mkstemp's mode is not private
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{option}: cannot write {path}: {reason}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


__all__ = ["write_text_atomically"]
