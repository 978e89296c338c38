"""The process set-up of every entry point and benchmark: XLA flags and host malloc, quiet logs, one-line errors.

`prepare_process()` runs first, before jax is imported: the XLA:CPU compiler flags (`xla_cpu_flags`), then a
restart under tcmalloc or mimalloc where the host is a CPU (`host_allocator`), then, for the CLIs,
`capture_native_output()`.
Then what the entry points print: our progress lines and results on the terminal, third-party logs in a file.
`quiet_third_party_logs(workdir)` sends every absl-routed record (orbax, TFDS, tensorflow) and library
warnings to `<workdir>/logs/<program>.log`; the terminal keeps other libraries' warnings (e.g. JAX's),
warnings raised by our own code and critical records. What C++ code (TF, absl, XLA, gloo) writes straight to
file descriptors 1 and 2 goes to the same log file: `capture_native_output` moves Python's `sys.stdout` and
`sys.stderr` to copies of the terminal's descriptors and buffers fds 1 and 2 in a temporary file until the
log file is known.
`report_user_error` turns a user mistake into one `error: …` line on stderr and exit status 2
(`CLOVER_DEBUG=1` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import tempfile
import threading

USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                               PermissionError, ValueError)
OUR_CODE = (f"{os.sep}clover_jax{os.sep}", f"{os.sep}data_pipelines{os.sep}", f"{os.sep}configs{os.sep}")
MAX_ERROR_CHARS = 1000


def prepare_process(log_native_output: bool = False) -> None:
    """Before jax starts: its CPU compiler flags, then a restart under tcmalloc or mimalloc where one is found
    (both only for a CPU platform; see `xla_cpu_flags.add_default_flags`, `host_allocator`). With
    `log_native_output` (the CLIs, which all call `quiet_third_party_logs`), `capture_native_output`."""
    from clover_jax.host_allocator import reexec_with_tuned_allocator
    from clover_jax.xla_cpu_flags import add_default_flags

    add_default_flags()
    reexec_with_tuned_allocator()
    if log_native_output:  # after the restart: an exec'd process starts with the terminal's fds again
        capture_native_output()


_native: dict[str, object] = {}  # "buffer": the temporary file holding fds 1 and 2 until the log file is known


def capture_native_output() -> None:
    """From now on Python's `sys.stdout` and `sys.stderr` (our progress lines, results, `error:` lines,
    tracebacks) write to copies of the terminal's descriptors, while file descriptors 1 and 2, where C++
    libraries print (TF's oneDNN notice, absl's "before absl::InitializeLog()" line, gloo's "[Gloo] Rank"
    lines, XLA and coordination errors, native stack traces), fill a temporary file that
    `quiet_third_party_logs` appends to the run's log file. Only for entry points: a process that never
    calls this (pytest, a notebook) keeps its descriptors."""
    if "buffer" in _native or "routed" in _native:
        return
    buffer = tempfile.TemporaryFile(prefix="clover_jax-native-")
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, name)
        stream.flush()
        terminal = os.dup(fd)  # not inherited by child processes (PEP 446); fds 1 and 2 are
        copy = os.fdopen(terminal, "w", encoding=stream.encoding, errors=stream.errors or "backslashreplace")
        copy.reconfigure(line_buffering=stream.line_buffering or name == "stderr",
                         write_through=getattr(stream, "write_through", False))
        setattr(sys, name, copy)
        os.dup2(buffer.fileno(), fd)
    _native["buffer"] = buffer


def route_native_output(log_file: pathlib.Path) -> None:
    """Appends what fds 1 and 2 buffered since `capture_native_output` to `log_file` and points both at it (at
    a new log file when called again); nothing happens where capture was never started."""
    if "buffer" not in _native and "routed" not in _native:
        return
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    buffer = _native.pop("buffer", None)
    if buffer is None:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    else:
        # fds 1 and 2 share the buffer's file offset: pread leaves it alone, so C++ writes racing with this
        # copy are not overwritten; what lands between the copy and the dup2s is copied after them.
        done = _copy_from(buffer.fileno(), fd, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        _copy_from(buffer.fileno(), fd, done)
        buffer.close()
    os.close(fd)
    _native["routed"] = str(log_file)


def _copy_from(src: int, dst: int, offset: int) -> int:
    while chunk := os.pread(src, 1 << 20, offset):
        os.write(dst, chunk)
        offset += len(chunk)
    return offset


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`error: … (--help lists the options)`), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {' '.join(message.split())} ({self.prog} --help lists the options)", file=sys.stderr)
        sys.exit(2)


class _TerminalFilter(logging.Filter):
    """Lets through what a person at the terminal needs: other libraries' warnings (JAX's), our own
    warnings, and only critical records of the absl-routed libraries."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            return any(part in record.getMessage() for part in OUR_CODE)
        if record.name in ("absl", "asyncio") or record.name.startswith(("orbax", "tensorflow", "tensorflow_datasets")):
            # Their errors come back to us as exceptions (e.g. a damaged checkpoint's read error, which the
            # restore reports in one line; asyncio repeats it for each of orbax's unawaited reads); the
            # log file keeps their tracebacks.
            return record.levelno >= logging.CRITICAL
        return record.levelno >= logging.WARNING


_installed: dict[str, logging.Handler] = {}


def _log_late_io_callback_errors() -> None:
    """tensorstore reads still in flight when a (damaged) restore fails complete on orbax's closed event
    loop and report `RuntimeError: Event loop is closed` through sys.excepthook; those go to the log file,
    every other uncaught error keeps its traceback on the terminal."""
    previous = sys.excepthook
    if getattr(previous, "clover_routes_late_callbacks", False):
        return

    def hook(exc_type, exc, tb):
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            logging.getLogger("clover_jax.io").info("late I/O callback", exc_info=(exc_type, exc, tb))
            return
        previous(exc_type, exc, tb)

    hook.clover_routes_late_callbacks = True  # type: ignore[attr-defined]
    sys.excepthook = hook
    # The same callbacks raised in tensorstore's threads, or with no caller to raise into.
    threading.excepthook = _route_late_callback(threading.excepthook)
    sys.unraisablehook = _route_late_callback(sys.unraisablehook)


def _route_late_callback(previous):
    """A threading/unraisable hook that logs 'Event loop is closed' to the log file, else calls `previous`."""

    def hook(args):
        if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed":
            logging.getLogger("clover_jax.io").info(
                "late I/O callback", exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
            return
        previous(args)

    return hook


def filter_terminal_logs() -> None:
    """Keeps INFO records of libraries (e.g. jax.distributed's "Connecting to ...") off the terminal before
    the log file is known; `quiet_third_party_logs` calls it too."""
    from absl import logging as absl_logging

    for handler in [*logging.getLogger().handlers, absl_logging.get_absl_handler()]:
        if not any(isinstance(f, _TerminalFilter) for f in handler.filters):
            handler.addFilter(_TerminalFilter())


def quiet_third_party_logs(workdir: pathlib.Path, program: str = "train") -> pathlib.Path:
    """Routes third-party logs to `<workdir>/logs/<program>[.process<i>].log`; returns that path."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax
    from absl import logging as absl_logging

    if program != "prepare":
        import orbax.checkpoint  # noqa: F401 - installs its stderr handler, which gets our filter below

    root = logging.getLogger()
    previous = _installed.pop("file", None)
    if previous is not None:
        root.removeHandler(previous)
        previous.close()
    filter_terminal_logs()
    # Only now: asking for the process index starts JAX's backends, which log at INFO.
    suffix = f".process{jax.process_index()}" if jax.process_count() > 1 else ""
    path = pathlib.Path(workdir) / "logs" / f"{program}{suffix}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path)
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] "
                                                "%(message)s"))
    root.addHandler(file_handler)
    _installed["file"] = file_handler
    route_native_output(path)
    root.setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.captureWarnings(True)
    _log_late_io_callback_errors()
    try:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()  # our own bars count clips
    except ImportError:
        pass
    return path


def exit_process(code: int) -> None:
    """Ends an entry point with `code`. After a user error (2) the process leaves at once, once stdout,
    stderr and the log file are flushed: I/O callbacks still pending from a failed (damaged) restore
    would otherwise print tracebacks while the interpreter shuts down."""
    if code == 2:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(2)
    sys.exit(code)


def report_user_error(err: BaseException) -> int:
    """Prints `err` as one `error: …` line on stderr and returns exit status 2; with CLOVER_DEBUG=1 the
    traceback is raised instead."""
    if os.environ.get("CLOVER_DEBUG"):
        raise err
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    print(f"error: {text}", file=sys.stderr, flush=True)
    return 2
