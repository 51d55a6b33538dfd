"""Worker processes for the single-edit protocol on a CPU: the cores split between N processes,
each with its own copy of the model, each editing and measuring whole groups of records.

An editing step on a small model spends much of its time outside large matrix products (the many
small operations of each layer, the LoRA adapters, sampling, the optimizer), where a second thread
adds little; N processes with ``cores / N`` threads each keep every core busy instead. Every group
is edited from the unedited model with the configuration's seed, whichever process edits it, so a
case equals what a one-process run gives up to float rounding (matrix products summed over another
split of threads).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from icelora.config import EditConfig
from icelora.errors import IceloraError
from icelora.icelora_editor import ICELoRAEditor
from icelora.models import LoadedModel

log = logging.getLogger(__name__)

Task = TypeVar("Task")
Result = TypeVar("Result")


@dataclass(frozen=True)
class EditorRecipe:
    """How a worker process builds its own editor.

    ``load`` must be picklable by reference (a module-level function, or ``functools.partial`` of
    one such as :func:`icelora.models.load_model` with the model's name, device and dtype): each
    worker calls it once and edits its own copy of the model.
    """

    load: Callable[[], LoadedModel]
    method: str
    config: EditConfig


def threads_per_worker(workers: int, threads: int | None = None) -> int:
    """The intra-op threads each of ``workers`` processes gets: this process's thread count
    (``threads``, default ``torch.get_num_threads()``) split evenly, at least one."""
    if workers < 1:
        raise IceloraError(f"workers must be at least 1, got {workers}")
    return max(1, (threads or torch.get_num_threads()) // workers)


_EDITOR: ICELoRAEditor | None = None


def _start_worker(recipe: EditorRecipe, threads: int) -> None:
    """Worker initializer: set its threads and build its editor (kept for every task it runs)."""
    global _EDITOR
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    torch.set_num_threads(threads)
    _EDITOR = ICELoRAEditor(recipe.load(), method=recipe.method, config=recipe.config)


def _run_task(function: Callable[[ICELoRAEditor, Any], Any], task: Any) -> Any:
    assert _EDITOR is not None, "worker started without its editor"
    return function(_EDITOR, task)


@contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`SystemExit` in this (main) thread, so that the caller's
    clean-up runs and the workers are stopped instead of being left running."""
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def map_in_workers(function: Callable[[ICELoRAEditor, Task], Result], tasks: Sequence[Task],
                   recipe: EditorRecipe, workers: int, threads: int | None = None) -> Iterator[tuple[int, Result]]:
    """``(k, function(editor, tasks[k]))`` for every task, run by ``workers`` processes, each with
    its own editor built from ``recipe`` and :func:`threads_per_worker` threads; yielded in the
    order the tasks finish, each as soon as it has.

    ``function`` must be picklable by reference (a module-level function). Tasks start in their
    order. An error in a task, or the caller stopping early (an exception, ``KeyboardInterrupt``,
    SIGTERM), stops every worker at once; what was yielded before stays the caller's.
    """
    if not tasks:
        return
    per_worker = threads_per_worker(workers, threads)
    context = multiprocessing.get_context("spawn")
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context,
                               initializer=_start_worker, initargs=(recipe, per_worker))
    log.info("%d worker processes, %d threads each", min(workers, len(tasks)), per_worker)
    finished_all = False
    try:
        with _terminate_on_sigterm():
            pending: dict[Future, int] = {pool.submit(_run_task, function, task): k for k, task in enumerate(tasks)}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(finished, key=pending.__getitem__):
                    yield pending.pop(future), future.result()
        finished_all = True
    finally:
        if not finished_all:
            pool.shutdown(wait=False, cancel_futures=True)
            _stop_children(before)
        pool.shutdown(wait=True)  # joins the pool's own thread and its (stopped or idle) workers
        _stop_children(before)


def _stop_children(before: set) -> None:
    """Terminate the child processes started since ``before`` was taken, and wait for them
    (killed when they do not end within 30 s); again while any is left (one the pool was still
    starting)."""
    for _ in range(5):
        started = set(multiprocessing.active_children()) - before
        if not started:
            return
        for process in started:
            process.terminate()
        for process in started:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        time.sleep(0.1)
