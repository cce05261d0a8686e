"""Tests of jaxnet.checkpoint.orbax_glue: Orbax's noise kept out of the terminal, its errors in one line."""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
import types

import pytest

from jaxnet import checkpoint as C
from jaxnet.checkpoint import orbax_glue
from tests.checkpoint.helpers import train_state

# What TensorStore raised when a full tmpfs stopped an OCDBT write (orbax-checkpoint 0.12.8).
_TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database at local file "/w/checkpoints/93.orbax-'
    'checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "/w/checkpoints/93.orbax-'
    'checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/d/9e69": Failed to write 138901 bytes to file 11: '
    "No space left on device [os_error_code='28']"
)


@pytest.mark.parametrize("array_format", C.ARRAY_FORMATS)
def test_orbax_info_lines_stay_out_of_the_log(tmp_path, caplog, array_format):
    state = train_state()
    with caplog.at_level(logging.DEBUG):
        ckpt = C.create_checkpoint_manager(tmp_path, best_metric="acc", array_format=array_format)
        C.save(ckpt, 1, state, meta={})  # no metric: Orbax would warn
        C.save(ckpt, 2, state, meta={}, metrics={"acc": 1.0})
        C.restore(ckpt, state)
        C.close(ckpt)
    noise = [r for r in caplog.records if f"{os.sep}orbax{os.sep}" in r.pathname]
    assert noise == []
    assert logging.getLogger().level == logging.WARNING  # the root logger is untouched


def test_write_failures_name_the_errno_the_path_and_the_fix(tmp_path):
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/w/checkpoints/3")
    assert orbax_glue.write_failure(wrapped, tmp_path) == (
        "Permission denied [EACCES] at /w/checkpoints/3",
        "make it writable or choose another --workdir",
    )
    cause, fix = orbax_glue.write_failure(ValueError(_TENSORSTORE_ENOSPC), tmp_path)
    assert cause == (
        "No space left on device [ENOSPC] at /w/checkpoints/93.orbax-checkpoint-tmp/state.orbax-"
        "checkpoint-tmp/ocdbt.process_0/d/9e69"
    )
    assert fix == "free some space or choose another --workdir"
    assert orbax_glue.write_failure(ValueError("bad spec\nmore"), tmp_path) == (
        "ValueError: bad spec",
        "choose another --workdir",
    )


def test_orbax_errors_are_one_line_checkpoint_errors():
    with pytest.raises(C.CheckpointError, match=r"^opening x failed: ValueError: first$"):
        with orbax_glue.orbax_errors("opening x"):
            raise ValueError("first\nsecond")


def _unraisable(exc: BaseException) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__, err_msg=None, object=None
    )


def test_only_the_late_write_race_of_a_failed_save_is_kept_off_stderr(caplog):
    seen = []
    hook = orbax_glue._LateWriteFilter(seen.append)

    def call_soon_threadsafe():  # where asyncio raises it, as TensorStore's callback calls it
        raise RuntimeError("Event loop is closed")

    def elsewhere():  # the same words from any other place are not the race
        raise RuntimeError("Event loop is closed")

    for raising in (call_soon_threadsafe, elsewhere, lambda: 1 / 0):
        try:
            raising()
        except Exception as exc:  # noqa: BLE001  (the hook sees any exception)
            with caplog.at_level(logging.DEBUG, logger="jaxnet.checkpoint"):
                hook(_unraisable(exc))
    assert [type(u.exc_value).__name__ for u in seen] == ["RuntimeError", "ZeroDivisionError"]
    assert [frame.name for frame in traceback.extract_tb(seen[0].exc_traceback)][-1] == "elsewhere"
    assert "finished after Orbax's event loop closed" in caplog.text
    orbax_glue.quiet_orbax()
    orbax_glue.quiet_orbax()
    assert isinstance(sys.unraisablehook, orbax_glue._LateWriteFilter)
    assert not isinstance(sys.unraisablehook.previous, orbax_glue._LateWriteFilter)  # installed once
