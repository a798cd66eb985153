"""Keep kineto's ``USDT: ... profiler_start`` / ``profiler_stop`` lines off the console.

torch 2.13's kineto writes one such line to stderr (file descriptor 2, from C++) each time a profiler window
starts or stops: two lines per trace window in every profiled run. ``KINETO_LOG_LEVEL`` hides them only together
with kineto's errors, and only when set before torch is imported, which neither the kit (a library) nor a user
in a running session can arrange. :func:`quiet_kineto` captures descriptor 2 around the profiler calls that
start or stop a window and writes every other line back. Torch-free.
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

USDT_PREFIX = b"USDT:"


def _flush_stderr() -> None:
    try:
        sys.stderr.flush()  # Python's buffered text lands before (or inside) the capture, in order
    except (AttributeError, ValueError, OSError):
        pass


@contextmanager
def quiet_kineto() -> Iterator[None]:
    """Run the body with kineto's USDT lines dropped from stderr; other output is passed through at the end."""
    _flush_stderr()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (a detached process): nothing to print to anyway
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = b"".join(line for line in tmp.read().splitlines(keepends=True)
                            if not line.startswith(USDT_PREFIX))
            while kept:
                kept = kept[os.write(2, kept):]
