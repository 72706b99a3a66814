"""Where a run writes: output locations checked before any work starts, and file-system errors said
in one line that names the path and the fix.

``check_output_dir(path, key)`` accepts a directory that exists and is writable, or one that can be
created: its nearest existing ancestor is a writable directory. Anything else (a regular file at the
path or above it, a read-only parent) is a :class:`weightgeom.core.config.ConfigError` naming
``key``, raised in about a millisecond, before data is read or a model is built.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from weightgeom.core.config import ConfigError

# What to do about an errno, in a few words.
FIXES = {
    errno.ENOSPC: "free disk space there, or write somewhere else",
    errno.EDQUOT: "free space within your quota, or write somewhere else",
    errno.EACCES: "check its permissions, or write somewhere else",
    errno.EPERM: "check its permissions, or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EISDIR: "it is a directory: give a file name",
    errno.ENOENT: "it does not exist: check the path",
    errno.EEXIST: "it exists already: remove it or choose another path",
}


def check_output_dir(path: str | Path, key: str) -> Path:
    """``path`` (user-expanded) is, or can become, a writable directory; else a ConfigError naming ``key``."""
    path = Path(path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{key}: {path} is a file, not a directory; choose another {key}")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: {path} is not writable by this user; choose another {key} or fix its "
                              "permissions")
        return path
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{key}: {path} lies under {ancestor}, which is a file, not a directory; choose another "
                          f"{key}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {path} would be created in {ancestor}, which is not writable by this user; "
                          f"choose another {key}")
    return path


def check_output_file(path: str | Path, key: str) -> Path:
    """``path`` may be written as a new directory of outputs (``--out``): not an existing file, and its
    directory can be created (:func:`check_output_dir`)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key} {path}: a file is there; give a directory (it is created if missing)")
    return check_output_dir(path, key)


def os_error_line(err: OSError) -> str:
    """``PATH: what failed (errno name); what to do`` for any OSError, without a traceback."""
    where = err.filename or ""
    if err.filename2:
        where = f"{where} -> {err.filename2}"
    what = err.strerror or str(err) or type(err).__name__
    fix = FIXES.get(err.errno or -1)
    parts = [f"{where}: {what}" if where else what]
    if fix and fix not in what:
        parts.append(fix)
    return "; ".join(parts)
