"""One background thread that runs the training loop's slow side calls (MLflow, progress lines) in order.

The training thread only enqueues: a synchronous MLflow commit or a ``ray.get`` on the progress
queue on rank 0 would stall every rank at the next collective. ``flush`` waits until everything
enqueued so far is done (the worker flushes before each checkpoint is reported, so MLflow holds
every point the checkpoint covers, and at exit); an error in a call is kept and raised there.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable

_STOP = object()


class BackgroundWriter:
    """``writer.submit(fn, *args)``; ``writer.flush()``; ``writer.close()`` (or ``with``)."""

    def __init__(self, name: str = "apex-ray-writer") -> None:
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                fn, args, kwargs = item
                if self._error is None:  # after a failure, later calls are dropped until it is raised
                    fn(*args, **kwargs)
            except BaseException as err:  # noqa: BLE001 - raised again on the training thread
                self._error = err
            finally:
                self._queue.task_done()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._raise_pending()
        self._queue.put((fn, args, kwargs))

    def flush(self) -> None:
        """Wait for every call submitted so far; raise the first error one of them hit."""
        self._queue.join()
        self._raise_pending()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # already failing: finish what was queued, but do not mask the training error
            try:
                self.close()
            except BaseException:  # noqa: BLE001
                pass
