"""The one error boundary of train.py and eval.py, and the workdir checks made before training.

A researcher who hits a known failure (a bad config key, a checkpoint of another model, a full
disk, ...) gets one message on stderr that starts with its category ("config error:",
"checkpoint error:", "disk full:", ...), names the thing and the fix, and a documented exit code
per category; no Python traceback. `--debug` (or the environment variable VLM_JAX_DEBUG=1) adds
the full traceback. Any other exception is a bug and keeps its traceback (exit code 1).

    exit code  meaning
    0          the run finished
    1          unexpected error (a bug): Python traceback
    2          bad command line (argparse usage message)
    3          config error
    4          data error (dataset, tokenizer, a missing input file)
    5          weights error (config.init sources, Hugging Face conversion)
    6          checkpoint error (another model's checkpoint, none readable, no such step)
    7          cannot write (workdir is a file, permission denied, read-only file system)
    8          disk full (before training: less free space than one checkpoint)
    9          training diverged (non-finite loss or parameters)
    75         stopped early, resumable (SIGTERM / preemption; EX_TEMPFAIL): rerun the same command
    130        interrupted (Ctrl-C)

docs/reliability.md lists every case with what the user sees and the test that checks it.

This module is a leaf: it imports no other vlm_jax module; the project's exception classes are
looked up in `sys.modules` when an error is classified (an exception of a module that was never
imported cannot occur).
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
import traceback
from typing import Callable

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_DATA = 4
EXIT_WEIGHTS = 5
EXIT_CHECKPOINT = 6
EXIT_UNWRITABLE = 7
EXIT_DISK_FULL = 8
EXIT_DIVERGED = 9
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130

DEBUG_ENV = "VLM_JAX_DEBUG"
MIN_FREE_ENV = "VLM_JAX_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 64          # reserve kept free besides one checkpoint (logs, eval files, vocab)


class WorkdirError(OSError):
    """The workdir cannot be used (a file, not writable, read-only); the message says the fix."""


class DiskFullError(WorkdirError):
    """Less free space than the run needs (checked before training) or ENOSPC during it."""


class DataError(ValueError):
    """A dataset / data file that cannot be used; the message names the file and the fix."""


def debug_enabled(argv: list[str] | None = None) -> bool:
    """--debug in ``argv`` or VLM_JAX_DEBUG=1 (true/yes) in the environment."""
    if argv is not None and "--debug" in argv:
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


# ----------------------------------------------------------------------------- classification
def _project_class(module: str, name: str):
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception chain; Orbax and TensorStore re-raise it as other
    types, so their text (the C library's strerror) is recognised too."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
    return False


def _oserror_message(e: OSError) -> tuple[int, str] | None:
    name = e.filename if e.filename is not None else ""
    what = f"{name}" if name else "a file"
    if isinstance(e, WorkdirError):
        return (EXIT_DISK_FULL if isinstance(e, DiskFullError) else EXIT_UNWRITABLE), str(e)
    if e.errno in (errno.EACCES, errno.EPERM):
        return EXIT_UNWRITABLE, (f"permission denied: cannot write {what} ({e.strerror}). Make it writable for this "
                                 "user (chmod / chown) or choose another --workdir.")
    if e.errno == errno.EROFS:
        return EXIT_UNWRITABLE, (f"read-only file system: cannot write {what}. Choose a --workdir on a writable "
                                 "disk.")
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return EXIT_UNWRITABLE, (f"not a directory: {what} ({e.strerror}): a path that must be a directory is a "
                                 "file (or the reverse). Move the file away or choose another --workdir.")
    if isinstance(e, FileNotFoundError):
        return EXIT_DATA, (f"not found: {e}" if not name else
                           f"not found: {name} ({e.strerror}). Check the path in the config or on the command "
                           "line.")
    return None


def classify(exc: BaseException) -> tuple[int, str] | None:
    """-> (exit code, one message with its category prefix) for a known project error, None for a bug."""
    checks = (
        ("vlm_jax.config_lib", "ConfigError", EXIT_CONFIG, "config error"),
        ("vlm_jax.checkpoint", "CheckpointError", EXIT_CHECKPOINT, "checkpoint error"),
        ("vlm_jax.checkpoint", "CheckpointMismatchError", EXIT_CHECKPOINT, "checkpoint error"),
        ("vlm_jax.init_sources", "InitSourceError", EXIT_WEIGHTS, "init error"),
        ("vlm_jax.convert.common", "ConversionError", EXIT_WEIGHTS, "weights error"),
        ("vlm_jax.data.pretrained_tokenizer", "TokenizerError", EXIT_DATA, "tokenizer error"),
    )
    if _is_disk_full(exc):
        if isinstance(exc, DiskFullError):
            return EXIT_DISK_FULL, str(exc)
        where = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
        if where is None:   # TensorStore / Orbax: 'Error writing local file "<path>"'
            import re
            found = [m for e in _chain(exc) for m in re.findall(r'file "([^"]+)"', str(e))]
            where = found[0] if found else None
        return EXIT_DISK_FULL, (f"disk full: no space left on device{f' while writing {where}' if where else ''} "
                                f"({type(exc).__name__}). Free space on that disk (or use a --workdir on another "
                                "one) and rerun the same command: it resumes from the last complete checkpoint, "
                                "which is kept (an interrupted save is ignored).")
    for module, name, code, prefix in checks:
        cls = _project_class(module, name)
        if cls is not None and isinstance(exc, cls):
            return code, f"{prefix}: {exc}"
    if isinstance(exc, DataError):
        return EXIT_DATA, f"data error: {exc}"
    if isinstance(exc, OSError):
        return _oserror_message(exc)
    if isinstance(exc, FloatingPointError):
        text = str(exc)
        return EXIT_DIVERGED, text if text.startswith("training diverged") else f"training diverged: {text}"
    return None


def run_cli(fn: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run an entry point's body ``fn(argv)`` inside the error boundary.

    Returns ``fn``'s exit code (None = 0). A known project error prints its message to stderr
    and raises SystemExit with its category's code (after the traceback with --debug /
    VLM_JAX_DEBUG=1); any other exception propagates with its traceback (a bug)."""
    debug = debug_enabled(argv)
    previous = os.environ.get(DEBUG_ENV)
    if debug:
        os.environ[DEBUG_ENV] = "1"       # library code (checkpoint walk-back) shows its noise too
    try:
        code = fn(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted (Ctrl-C); a training run resumes from its last checkpoint when rerun.", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as exc:  # noqa: BLE001 -- classified below; unknown ones are re-raised
        known = classify(exc)
        if known is None:
            raise
        code, message = known
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        else:
            message += "\n(rerun with --debug or VLM_JAX_DEBUG=1 for the traceback)"
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(code) from None
    finally:
        if previous is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = previous
    return EXIT_OK if code is None else int(code)


class OneLineLibraryErrors:
    """A logging filter for the 'absl' logger: Orbax logs each failing background thread of a save
    (a full disk: five threads) with its traceback; keep the first line of each record, cut to
    300 characters, without the traceback (the boundary's message says what happened; --debug
    keeps everything)."""

    def filter(self, record) -> bool:
        if record.exc_info and "/orbax/" in (record.pathname or ""):
            first = record.getMessage().splitlines()[0] if record.getMessage() else ""
            record.msg, record.args = (first[:297] + "...") if len(first) > 300 else first, ()
            record.exc_info, record.exc_text = None, None
        return True


_ASYNC_NOISE = ("Event loop is closed", "Encountered error while reading")
_async_noise = {"logger_filter": False, "suppressed": 0}


def _is_async_noise(text: str) -> bool:
    return any(m in text for m in _ASYNC_NOISE)


_LEFTOVER_FAILURES = _ASYNC_NOISE + ("No space left on device", "RESOURCE_EXHAUSTED")


class _AsyncioNoiseFilter:
    """asyncio's 'Task/Future exception was never retrieved' for a failed Orbax read or write
    (unreadable step, full disk); any other asyncio record passes."""

    def filter(self, record) -> bool:
        message = record.getMessage()[:4000]
        exc = record.exc_info[1] if record.exc_info else None
        text = message + (str(exc) if exc is not None else "")
        if _is_async_noise(text) or ("never retrieved" in message
                                     and any(m in text for m in _LEFTOVER_FAILURES)):
            _async_noise["suppressed"] += 1
            return False
        return True


def quiet_async_noise() -> None:
    """A failed Orbax read or write leaves TensorStore futures and asyncio tasks behind whose
    exceptions are reported later, from other threads or at garbage collection ('Event loop is
    closed', 'Exception ignored in: <coroutine ...>', asyncio's 'Task exception was never
    retrieved'): dozens of tracebacks for one unreadable step or one full disk, after the real
    error was already reported. Drop exactly those (recognised by their text; everything else
    still reaches the previous hooks). Idempotent; VLM_JAX_DEBUG=1 keeps them."""
    import logging
    if debug_enabled():
        return
    if not _async_noise["logger_filter"]:
        _async_noise["logger_filter"] = True
        logging.getLogger("asyncio").addFilter(_AsyncioNoiseFilter())
    if getattr(sys.unraisablehook, "_vlm_jax_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if _is_async_noise(str(unraisable.exc_value)):
            _async_noise["suppressed"] += 1
            return
        previous(unraisable)

    hook._vlm_jax_quiet = True
    sys.unraisablehook = hook


# ----------------------------------------------------------------------------- workdir checks
def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def min_free_bytes() -> int:
    """The reserve kept free besides one checkpoint: VLM_JAX_MIN_FREE_MB (default 64)."""
    raw = os.environ.get(MIN_FREE_ENV, "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_MIN_FREE_MB
    except ValueError:
        raise WorkdirError(f"{MIN_FREE_ENV}={raw!r} must be a number of MiB (e.g. {MIN_FREE_ENV}=64).") from None
    return int(max(mb, 0.0) * 2 ** 20)


def check_workdir(workdir: str) -> None:
    """Before anything is written: the workdir (or the directory it will be created in) is a
    writable directory with at least the reserve free (`min_free_bytes`). Writes nothing."""
    path = os.path.abspath(workdir)
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        if existing == path:
            raise WorkdirError(f"workdir error: --workdir {workdir!r} is a file, not a directory. Pass a directory "
                               "(it is created if missing) or move the file away.")
        raise WorkdirError(f"workdir error: --workdir {workdir!r} cannot be created: {existing!r} is a file, not a "
                           "directory. Choose another --workdir or move the file away.")
    subject = f"--workdir {workdir!r}" if existing == path else f"{existing!r} (where --workdir {workdir!r} is created)"
    if not _writable(existing):
        if _read_only(existing):
            raise WorkdirError(f"read-only file system: {subject} is on a read-only disk. Choose a --workdir on a "
                               "writable disk.")
        raise WorkdirError(f"permission denied: {subject} is not writable by this user. Make it writable "
                           "(chmod / chown) or choose another --workdir.")
    check_free_space(workdir, 0, "")


def _writable(path: str) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_free_space(workdir: str, need_bytes: int, what: str) -> None:
    """DiskFullError unless the workdir's disk has ``need_bytes`` + the reserve free."""
    existing = _nearest_existing(workdir)
    free = shutil.disk_usage(existing).free
    need = int(need_bytes) + min_free_bytes()
    if free < need:
        detail = f"{_fmt_bytes(need_bytes)} for {what} + " if need_bytes else ""
        raise DiskFullError(
            f"disk full: the disk of --workdir {workdir!r} has {_fmt_bytes(free)} free, but this run needs at least "
            f"{_fmt_bytes(need)} ({detail}a reserve of {_fmt_bytes(min_free_bytes())}, set by {MIN_FREE_ENV}). "
            "Free space on that disk or use a --workdir on another one; training did not start.")


def state_bytes(tree) -> int:
    """Bytes of the arrays of a pytree of arrays / ShapeDtypeStructs (the size of one checkpoint)."""
    import jax
    import numpy as np
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def check_room_for_checkpoint(workdir: str, abstract_state) -> None:
    """Before the first step: room for one checkpoint of ``abstract_state`` (+ the reserve)."""
    check_free_space(workdir, state_bytes(abstract_state), "one checkpoint of the train state")
