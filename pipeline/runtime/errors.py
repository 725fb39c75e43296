"""Errors whose message is meant for the user (the CLI prints them without a traceback, exit 2).

They live apart from the stage runner so the library layers under it (data formats, readers,
manifests) can raise them without importing the runner.
"""
import errno


class StageError(RuntimeError):
    """A failure with a message meant for the user (shown without a traceback by the CLI, exit 2)."""


_OS_ERROR_HINTS = {
    errno.ENOSPC: "no space left on the device: free space or point --run-dir at a larger filesystem",
    errno.EDQUOT: "disk quota exceeded: free space or use another filesystem",
    errno.EROFS: "the filesystem is read-only: use a writable --run-dir",
    errno.EACCES: "permission denied: check the owner and mode of the run directory",
    errno.EPERM: "operation not permitted: check the owner and mode of the run directory",
    errno.ENOENT: "no such file or directory",
}


def describe_os_error(err: OSError, doing: str) -> str:
    """One line naming what failed, the path and the cause, e.g. for a full or read-only disk."""
    where = f" ({err.filename})" if err.filename else ""
    hint = _OS_ERROR_HINTS.get(err.errno, err.strerror or str(err))
    code = errno.errorcode.get(err.errno, "") if err.errno else ""
    return f"{doing}{where}: {hint}" + (f" [{code}]" if code else "")


class CorruptFileError(StageError, ValueError):
    """A file that should hold JSON (a manifest, done.json, a sidecar) is truncated or corrupt."""
