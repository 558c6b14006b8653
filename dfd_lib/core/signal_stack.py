"""A valid alternate signal stack after OpenVINO.

OpenVINO's CPU plugin gives the thread that compiles a model an alternate signal stack of its own
(``sigaltstack``) and, when the model is released, puts back the one it found. With several models
whose lifetimes overlap (the pipeline's experts, a Predictor beside them), the one put back can be a
stack another model has since unmapped. Python runs its signal handlers on that stack, so the next
signal one catches (SIGCHLD when a DataLoader worker exits, Ctrl-C in a notebook, SIGTERM in the
server) kills the process with SIGSEGV, far from the cause (seen: a test worker lost in the suite).
:func:`reinstall_signal_stack`, called after each compile and after each release, gives the thread
the kit's own stack, allocated once and kept for the life of the process.
"""
from __future__ import annotations

import ctypes
import sys

STACK_BYTES = 1 << 16  # far above glibc's SIGSTKSZ (8 KiB here): Python's handlers and faulthandler fit


class _StackT(ctypes.Structure):  # stack_t of <signal.h>
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_libc = None
_stack = None  # the kit's alternate stack: never freed


def _sigaltstack():
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    return getattr(_libc, "sigaltstack", None) if _libc else None


def current_signal_stack() -> tuple[int, int]:
    """(address, size) of this thread's alternate signal stack; (0, 0) where there is none or no way to ask."""
    sigaltstack = _sigaltstack()
    if sigaltstack is None:
        return 0, 0
    old = _StackT()
    if sigaltstack(None, ctypes.byref(old)) != 0 or old.ss_flags & 2:  # SS_DISABLE
        return 0, 0
    return old.ss_sp or 0, old.ss_size


def reinstall_signal_stack() -> bool:
    """Give this thread the kit's own alternate signal stack; ``False`` off Linux or when the call fails
    (e.g. while a handler is running on the current one)."""
    global _stack
    sigaltstack = _sigaltstack()
    if sigaltstack is None:
        return False
    if _stack is None:
        _stack = ctypes.create_string_buffer(STACK_BYTES)
    stack = _StackT(ctypes.cast(_stack, ctypes.c_void_p), 0, STACK_BYTES)
    return sigaltstack(ctypes.byref(stack), None) == 0


def release_openvino(owner, *names: str) -> None:
    """Drop ``owner``'s OpenVINO objects named ``names`` (an infer request before its compiled model), then
    reinstall the kit's stack: the release may have put back one that no longer exists."""
    for name in names:
        owner.__dict__.pop(name, None)
    reinstall_signal_stack()
