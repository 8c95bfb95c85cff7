"""A graceful stop of training on SIGTERM or SIGINT (a scheduler's preemption or time limit, Ctrl-C).

While :class:`GracefulStop` is active (``diffalign train`` wraps the training loop in it), the first SIGTERM or
SIGINT only records a stop request: the epoch in progress finishes, every rank stops after it (the request of any
rank is shared, see :func:`trainers.common.should_stop`), a checkpoint is written, and the command exits with
status ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT) so that a job script or scheduler sees a
stopped, resumable run. The same command with ``checkpoint.resume_from=latest`` (the shipped configs' setting)
continues exactly where it stopped.

A second SIGINT (Ctrl-C twice) stops at once with :class:`KeyboardInterrupt`: the work since the last checkpoint
is lost, and the checkpoints on disk stay intact (they are written atomically). Repeated SIGTERMs are not
escalated, because launchers forward one signal as another (torchrun's agent answers Ctrl-C by sending SIGTERM to
its workers); a scheduler that wants the process gone follows with SIGKILL after its grace period. On SLURM,
``#SBATCH --signal=TERM@300`` asks for the signal 300 s before the time limit, enough for an epoch to finish.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

_active: Optional["GracefulStop"] = None


class GracefulStop:
    """Context manager: SIGTERM / SIGINT request a stop at the end of the current epoch (module docstring).

    Installs its handlers only in the main thread (Python delivers signals there); elsewhere it is inert and
    signals keep their previous handling. ``requested`` is the first signal's number, or ``None``.
    """

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self, announce: bool = True) -> None:
        self.requested: Optional[int] = None
        self.announce = announce
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        global _active
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                signum = getattr(signal, name, None)
                if signum is not None:
                    self._previous[signum] = signal.signal(signum, self._handle)
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous.clear()
        _active = None

    def _handle(self, signum: int, frame) -> None:
        if self.requested is None:
            self.requested = signum
            if self.announce:  # os.write, not print: a handler that prints while a progress bar writes can raise
                message = (f"\ndiffalign: got {signal.Signals(signum).name}: stopping after this epoch with a "
                           "checkpoint (Ctrl-C again stops now and loses the epoch)\n")
                try:
                    os.write(sys.stderr.fileno(), message.encode())
                except (OSError, ValueError, AttributeError):  # no usable stderr descriptor: stop quietly
                    pass
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt("second interrupt: stopped at once; the checkpoints on disk are intact")


def stop_requested() -> Optional[int]:
    """The signal number of a pending stop request, or ``None`` (also when no :class:`GracefulStop` is active)."""
    return _active.requested if _active is not None else None


def stop_active() -> bool:
    """Whether a :class:`GracefulStop` is active in this process (``diffalign train`` runs under one on every
    rank, so the ranks agree on it and share their requests through one collective per epoch)."""
    return _active is not None
