"""The conventions every step's command line shares: one parser factory (--version, the
"Exit status" section of --help), one set of argparse value checks, one progress report.

Exit status, the same in every step:
    0    everything asked for was done
    1    finished, but some inputs were skipped (each one is named on stderr); also
         Python's status for an unexpected crash (a traceback)
    2    bad arguments or an expected failure (one line on stderr; nothing half-written)
    130  interrupted (Ctrl-C)
1 is what step2 and step5 always returned for an unreadable image, and 2 is run_main's
status for an expected failure, so only step0 changed (it returned 0 after skipping).

Progress: a tqdm bar when stderr is a terminal; otherwise (a pipe, a log file, Slurm
output) one line "DESC: k/N [p%, r UNIT/s]" about every PROGRESS_INTERVAL_S seconds, and
no bar text at all. GBMPCNSL_PROGRESS_SECONDS overrides the interval (tests, short jobs).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import time

from gbmpcnsl import __version__

EXIT_STATUS = """\
Exit status:
  0    everything asked for was done
  1    finished, but some inputs were skipped (each is named on stderr)
  2    bad arguments or an expected failure (one line on stderr; nothing half-written)
  130  interrupted (Ctrl-C)"""

PROGRESS_INTERVAL_S = 60.0
log = logging.getLogger("gbmpcnsl")


# ---------------------------------------------------------------------------- the parser
def version_text(prog: str) -> str:
    """'PROG (gbm-pcnsl V): TensorFlow A, Keras B, numpy C', without importing TensorFlow."""
    versions = []
    for name, distribution in (("TensorFlow", "tensorflow"), ("Keras", "keras"), ("numpy", "numpy")):
        try:
            versions.append(f"{name} {importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    return f"{prog} (gbm-pcnsl {__version__}): {', '.join(versions)}"


def make_parser(prog: str, description: str | None, epilog: str = "") -> argparse.ArgumentParser:
    """A step's parser: its docstring as description, --version, and the exit status
    (after `epilog`, a step's own notes on its statuses) at the end of --help."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"{epilog}\n\n{EXIT_STATUS}" if epilog else EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text(prog))
    return parser


def hidden_alias(parser, old: str, new: str, **kwargs) -> None:
    """`old` still works as `new` (same dest) for one release, and is left out of --help."""
    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


# ---------------------------------------------------------------------------- value checks
def checked(name: str, convert, test, expected: str):
    """An argparse type: `convert`, then `test`, else "invalid NAME value: 'TEXT'
    (expected ...)" with the usage line, as argparse reports a bad value."""

    def check(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: expected {expected}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text}: expected {expected}")
        return value

    check.__name__ = name  # argparse names it in "invalid ... value"
    return check


positive_int = checked("positive_int", int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = checked("non_negative_int", int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked("positive_float", float, lambda v: v > 0, "a number > 0")
non_negative_float = checked("non_negative_float", float, lambda v: v >= 0, "a number >= 0")
below_one = checked("below_one", float, lambda v: 0 <= v < 1, "a number in [0, 1)")
probability = checked("probability", float, lambda v: 0 <= v <= 1, "a number between 0 and 1")
fraction = checked("fraction", float, lambda v: 0 < v < 1, "a fraction between 0 and 1 (exclusive)")


# ---------------------------------------------------------------------------- progress
def progress_interval() -> float:
    """Seconds between progress lines: GBMPCNSL_PROGRESS_SECONDS, else PROGRESS_INTERVAL_S
    (also when the variable is not a number)."""
    try:
        return float(os.environ.get("GBMPCNSL_PROGRESS_SECONDS", PROGRESS_INTERVAL_S))
    except ValueError:
        return PROGRESS_INTERVAL_S


class Progress:
    """A progress report over `total` items: a tqdm bar on a terminal, else a log line
    about every interval. update(n), write(message) (above the bar), close(); a context
    manager. While a bar is shown, log messages print above it."""

    def __init__(
        self, total: int, desc: str, unit: str = "img", stream=None, interval_s: float | None = None
    ):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.stream = stream if stream is not None else sys.stderr
        if interval_s is None:
            interval_s = progress_interval()
        self.interval_s, self.started = interval_s, time.monotonic()
        self.last_line, self.bar, self.redirect = self.started, None, None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False)
            self.redirect = logging_redirect_tqdm()
            self.redirect.__enter__()

    def update(self, n: int = 1) -> None:
        """`n` more items done; on a pipe, a line once the interval has passed."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval_s:
            self.last_line = now
            percent = 100 * self.done / self.total if self.total else 100
            rate = self.done / max(now - self.started, 1e-9)
            self._line(f"{self.desc}: {self.done}/{self.total} [{percent:.0f}%, {rate:.1f} {self.unit}/s]")

    def write(self, message: str) -> None:
        """One line on the stream, above the bar if there is one."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            self._line(message)

    def _line(self, text: str) -> None:
        """text and its newline in one write: a Ctrl-C between print's two writes would
        leave the next message ("interrupted") glued to this line."""
        self.stream.write(f"{text}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.redirect.__exit__(None, None, None)
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
