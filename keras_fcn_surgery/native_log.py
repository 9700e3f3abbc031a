"""Keeping the C++ log lines TensorFlow and Ray write straight to file descriptor 2 off the terminal.

TensorFlow's runtime and converters log through absl to the process's stderr
descriptor, past Python's `sys.stderr` and `warnings`: CUDA probes when it
loads, "Ignored output_format" from the TFLite converter; so does Ray's core
worker in the driver during a batch on Ray. They are captured while such a
call runs and shown only when it fails, where they may explain why.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def native_stderr_captured():
    """Capture what is written to file descriptor 2 inside the block; write it back only if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            os.write(2, captured.read())  # back where it was going: the process's stderr
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
