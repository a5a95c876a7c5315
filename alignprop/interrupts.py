"""Ctrl-C during training: finish the current update, save it, leave (a second Ctrl-C aborts at once)."""

from __future__ import annotations

import contextlib
import signal
import threading


class InterruptFlag:
    """SIGINT sets a flag that the loop reads between updates; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.raised = False

    def handle(self, signum, frame) -> None:
        self.raised = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\ninterrupt: finishing this update and saving a checkpoint (Ctrl-C again to abort)", flush=True)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            yield self
            return
        previous = signal.signal(signal.SIGINT, self.handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
