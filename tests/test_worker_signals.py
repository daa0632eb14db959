"""Signal-safe workers: terminate() cannot hang, SIGTERM is never lost, Ctrl+C is the parent's,
the parent's handlers and atexit logic stay out of workers.

Each behaviour is shown first with the stdlib alone (the control), under fork, spawn and
forkserver; scenarios that signal a process group or hang on purpose run in a driver process
(``python -m workers_targets ...``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import logging
import multiprocessing
import multiprocessing.pool
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import workers_targets
from helpers import FORK_WARNING, LONG, SHORT, START_METHODS, wait_until
from safepool import workers
from safepool._signals import HANDLER_GRACE, make_worker_signal_safe
from safepool.errors import TaskAborted, WorkerLost
from safepool.workers import (
    TERMINATED_EXIT_CODE,
    WorkerSetup,
)
from workers_targets import alive

pytestmark = [pytest.mark.filterwarnings(FORK_WARNING), pytest.mark.timeout(300)]

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Finalise each test's dead pools and locks here, at a safe point. Left to a later garbage
    collection, their semaphores' finalisers can run inside a resource-tracker call, which
    CPython 3.11.7+ reports as "Reentrant call into the multiprocessing resource tracker" (an
    unraisable warning, so a failure under -W error; we saw it on 3.12)."""
    yield
    gc.collect()


# -- signals: terminate() ------------------------------------------------------------------------


class Driver:
    """``python -m workers_targets <args>`` in a session of its own; reads its JSON lines."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        environ = dict(os.environ, PYTHONPATH=str(TESTS), **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers_targets", *args],
            cwd=TESTS,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._buffer = b""

    def message(self, timeout: float = LONG) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, remaining))
            if not ready:
                raise TimeoutError(f"no message from the driver within {timeout}s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"driver ended early: {self.stderr()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def stderr(self, timeout: float = LONG) -> str:
        _, err = self.proc.communicate(timeout=timeout)
        return err.decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()


@pytest.mark.parametrize("method", START_METHODS)
def test_control_exception_raising_sigterm_handler_hangs_terminate(method: str) -> None:
    """Seed 003: the handler raises an Exception subclass; Pool.worker takes it for a failed
    task and waits for more work, and terminate() + join() never return."""
    driver = Driver("terminate", method, "exception-handler")
    try:
        pids = driver.message()["ready"]
        outcome = driver.message()
        assert outcome["finished"] is False  # not within 2 s: the workers will never exit
        # ... although the handler ran (the task's finally saw HandlerError, then Pool.worker
        # took it for a failed task and went back for more work).
        assert outcome["cleaned"]
        assert all(how == "HandlerError" and pid in pids for pid, how in outcome["cleaned"])
        assert driver.proc.wait(LONG) == 0
    finally:
        driver.kill()
    for pid in pids:  # (the driver killed them before it left)
        wait_until(lambda pid=pid: not alive(pid), SHORT, f"worker {pid} gone")


@pytest.mark.parametrize("method", START_METHODS)
def test_signal_safe_terminate_is_prompt_and_runs_cleanup(method: str) -> None:
    driver = Driver("terminate", method, "helper")
    try:
        pids = driver.message()["ready"]
        outcome = driver.message()
        assert outcome["finished"] is True
        assert outcome["seconds"] < 2.0
        assert sorted(outcome["cleaned"]) == sorted([pid, "WorkerTerminated"] for pid in pids)
        assert driver.proc.wait(LONG) == 0
    finally:
        driver.kill()


@pytest.mark.parametrize("method", START_METHODS)
def test_terminated_workers_exit_143_after_their_finally_blocks(method: str) -> None:
    setup = WorkerSetup(context=method)
    ready = setup.queue("ready")
    setup.event("never")
    cleaned = setup.add("cleaned", setup.context.SimpleQueue())
    pool = setup.Pool(3)
    pool.map_async(workers_targets.report_and_block, range(3), chunksize=1)
    pids = sorted(ready.get(timeout=LONG) for _ in range(3))
    started = time.monotonic()
    pool.terminate()
    pool.join()
    assert time.monotonic() - started < 2.0
    assert sorted(pool.exits) == [(pid, TERMINATED_EXIT_CODE) for pid in pids]
    assert sorted(cleaned.get() for _ in range(3)) == [(pid, "WorkerTerminated") for pid in pids]


@pytest.mark.parametrize("method", START_METHODS)
def test_a_lease_held_by_a_terminated_worker_is_released(method: str) -> None:
    setup = WorkerSetup(context=method)
    ready = setup.queue("ready")
    setup.event("never")
    released = setup.add("cleaned", setup.context.SimpleQueue())
    pool = setup.Pool(2)
    pool.map_async(workers_targets.lease_and_block, range(2), chunksize=1)
    pids = sorted(ready.get(timeout=LONG) for _ in range(2))
    pool.terminate()
    pool.join()
    assert sorted(released.get() for _ in range(2)) == [(pid, "released") for pid in pids]


@pytest.mark.parametrize("method", START_METHODS)
def test_a_child_forked_by_a_task_gets_its_own_watcher(method: str) -> None:
    setup = WorkerSetup(context=method)
    with setup.Pool(1) as pool:
        report = pool.apply(workers_targets.fork_and_report)
    assert report == {
        "handler_is_ours": True,
        "new_watcher": True,
        "thread_alive": True,
        "wakeup_is_its_pipe": True,
    }


@pytest.mark.parametrize("signal_safe", [False, True], ids=["control", "helper"])
@pytest.mark.parametrize("method", START_METHODS)
def test_sigterm_is_not_lost_when_the_main_thread_cannot_run_its_handler(
    method: str, signal_safe: bool
) -> None:
    """The SIGTERM's C-level handler runs while the main thread is blocked in read() (the race
    of a signal landing just before a blocking call, made deterministic). The control has a
    correct handler (SystemExit) but nothing that interrupts the read: the worker stays."""
    setup = WorkerSetup(context=method)
    sent = setup.add("sent", setup.context.SimpleQueue())
    cleaned = setup.add("cleaned", setup.context.SimpleQueue())
    if signal_safe:
        pool: Any = setup.Pool(1)
    else:
        initializer = workers_targets.install_system_exit_sigterm_handler
        pool = setup.context.Pool(1, **setup.pool_kwargs(initializer=initializer,
                                                         signal_safe=False))  # fmt: skip
    try:
        pool.apply_async(workers_targets.sigterm_while_main_thread_blocked)
        pid = sent.get()  # blocks until the SIGTERM was delivered (bounded by the test timeout)
        started = time.monotonic()
        if signal_safe:
            wait_until(lambda: not cleaned.empty(), SHORT, "the task's finally block")
            assert time.monotonic() - started < HANDLER_GRACE  # interrupted, not the fallback
            assert cleaned.get() == (pid, "WorkerTerminated")
        else:
            with pytest.raises(TimeoutError):
                wait_until(lambda: not cleaned.empty(), 2 * HANDLER_GRACE, "never")
            assert alive(pid)
    finally:
        pool.terminate()  # a second SIGTERM interrupts the control's read
        pool.join()


# -- signals: Ctrl+C, the parent's handlers, atexit ----------------------------------------------


@pytest.mark.parametrize("signal_safe", ["0", "1"], ids=["control", "helper"])
@pytest.mark.parametrize("method", START_METHODS)
def test_ctrl_c_reaches_the_parent_and_no_worker_survives(method: str, signal_safe: str) -> None:
    driver = Driver("ctrl-c", method, signal_safe)
    try:
        pids = driver.message()["ready"]
        os.killpg(driver.proc.pid, signal.SIGINT)  # Ctrl+C: the whole process group
        outcome = driver.message()
        stderr = driver.stderr()
    finally:
        driver.kill()
    assert driver.proc.returncode == 0
    assert outcome["outcome"] == "KeyboardInterrupt"
    for pid in pids:
        wait_until(lambda pid=pid: not alive(pid), SHORT, f"worker {pid} gone")
    if signal_safe == "1":
        # The workers ignored Ctrl+C; the parent's terminate() ended them.
        assert outcome["before_terminate"] == []
        assert dict(outcome["cleaned"]) == dict.fromkeys(pids, "WorkerTerminated")
        assert "KeyboardInterrupt" not in stderr
    else:
        # Ctrl+C hit the workers too, in the middle of their tasks. (Not always all of them in
        # time: a worker whose Queue feeder thread takes the SIGINT stays blocked until the
        # parent terminates it, the very race safepool's watcher thread handles for SIGTERM.)
        before = dict(outcome["before_terminate"])
        assert before
        assert set(before) <= set(pids)
        assert set(before.values()) == {"KeyboardInterrupt"}


@pytest.mark.parametrize("signal_safe", ["0", "1"], ids=["control", "helper"])
def test_parent_signal_handlers_and_wakeup_fd_stay_out_of_fork_workers(
    tmp_path: Path, signal_safe: str
) -> None:
    driver = Driver("parent-handlers", "fork", signal_safe, str(tmp_path))
    try:
        pids = driver.message()["ready"]
        if signal_safe == "0":
            # The inherited handler raises SystemExit inside the workers: stdlib terminate()
            # can hang on that too (the hazard itself). Then the evidence is on disk.
            try:
                outcome = driver.message(timeout=3 * SHORT)
            except TimeoutError:
                driver.kill()
                ran = {p.name for p in tmp_path.glob("handler-ran-in-*")}
                assert ran and ran <= {f"handler-ran-in-{pid}" for pid in pids}
                assert not (tmp_path / "service.pid").exists()
                return
        else:
            outcome = driver.message()
        assert driver.proc.wait(LONG) == 0
    finally:
        driver.kill()
    states = outcome["worker_states"]
    if signal_safe == "0":
        # Inherited: terminate() ran the parent's pidfile-removing handler in the workers, and
        # their signals were written into the parent's wakeup fd.
        assert outcome["pidfile_exists"] is False
        assert set(outcome["handler_ran_in"]) <= {f"handler-ran-in-{pid}" for pid in pids}
        assert outcome["handler_ran_in"]
        assert signal.SIGTERM in outcome["wakeup_bytes"]
        assert all("remove_pidfile_and_exit" in s["SIGUSR1"] for s in states)
        assert all(s["wakeup_fd"] == str(outcome["parent_wakeup_fd"]) for s in states)
    else:
        assert outcome["pidfile_exists"] is True
        assert outcome["handler_ran_in"] == []
        assert outcome["wakeup_bytes"] == []
        assert sorted(outcome["cleaned"]) == sorted([pid, "WorkerTerminated"] for pid in pids)
        for state in states:
            assert state["SIGTERM"] == "_on_sigterm"
            assert state["SIGINT"] == "_ignore_sigint"
            assert state["SIGHUP"] == "SIG_DFL"
            assert state["SIGUSR1"] == "_on_soft_limit"  # the soft time limit's signal
            assert state["wakeup_fd"] != str(outcome["parent_wakeup_fd"])


@pytest.mark.parametrize("signal_safe", ["0", "1"], ids=["control", "helper"])
def test_asyncio_parent_with_a_sigterm_handler_and_fork_workers(signal_safe: str) -> None:
    """Fork workers inherit asyncio's no-op Python SIGTERM handler, so terminate() hangs; on
    3.10 and 3.11 they also inherit the loop's wakeup fd, and the parent runs its own SIGTERM
    handler for the signals its workers get (3.12+ reset the wakeup fd in forked children)."""
    driver = Driver("asyncio-parent", "fork", signal_safe)
    try:
        pids = driver.message()["ready"]
        outcome = driver.message()
        assert driver.proc.wait(LONG) == 0
    finally:
        driver.kill()
    if signal_safe == "0":
        assert outcome["finished"] is False
        assert outcome["parent_handler_ran"] is (sys.version_info < (3, 12))
    else:
        assert outcome["finished"] is True
        assert outcome["parent_handler_ran"] is False
        assert sorted(outcome["cleaned"]) == sorted([pid, "WorkerTerminated"] for pid in pids)
    for pid in pids:
        wait_until(lambda pid=pid: not alive(pid), SHORT, f"worker {pid} gone")


def stdlib_runs_import_time_atexit_handlers(method: str) -> bool:
    """Verified truth: fork workers end with os._exit; spawn workers exit the interpreter
    normally; forkserver workers run atexit handlers from Python 3.13 on."""
    return method == "spawn" or (method == "forkserver" and sys.version_info >= (3, 13))


# (The stdlib with terminate() is left out: SIGTERM's default action kills, no atexit runs.)
@pytest.mark.parametrize(
    ("signal_safe", "how"),
    [("0", "close"), ("1", "close"), ("1", "terminate")],
    ids=["control-close", "helper-close", "helper-terminate"],
)
@pytest.mark.parametrize("method", START_METHODS)
def test_atexit_handlers_of_the_parents_main_module(
    tmp_path: Path, method: str, signal_safe: str, how: str
) -> None:
    driver = Driver("atexit", method, signal_safe, how, env={
        "WORKERS_TARGETS_ATEXIT_DIR": str(tmp_path)
    })  # fmt: skip
    try:
        outcome = driver.message()
        assert driver.proc.wait(LONG) == 0
    finally:
        driver.kill()
    markers = {int(p.name.split("-")[1]) for p in tmp_path.glob("atexit-*")}
    assert outcome["parent"] in markers  # the handler works: it ran in the parent
    worker_markers = markers & set(outcome["workers"])
    if signal_safe == "1":
        assert worker_markers == set()
    elif stdlib_runs_import_time_atexit_handlers(method):
        assert worker_markers == set(outcome["workers"])
    else:
        assert worker_markers == set()


def test_signal_safe_setup_refuses_the_main_process_and_skips_threads(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeError, match="not a multiprocessing child"):
        make_worker_signal_safe()
    monkeypatch.setattr(workers, "_worker_resources", None)  # restored after the test
    setup = WorkerSetup(context="spawn")
    setup.lock("lock")
    sigint = signal.getsignal(signal.SIGINT)
    with (
        caplog.at_level(logging.WARNING, logger="safepool"),
        multiprocessing.pool.ThreadPool(1, **setup.pool_kwargs()) as pool,
    ):
        assert pool.apply(workers_targets.lookup, ("lock",)) is setup.resources["lock"]
    assert signal.getsignal(signal.SIGINT) is sigint
    assert "has no effect in thread" in caplog.text


# -- ProcessPoolExecutor and SIGTERM -------------------------------------------------------------


@pytest.mark.parametrize("method", START_METHODS)
def test_control_executor_sigterm_in_a_task_and_then_an_idle_worker_breaks_it(
    method: str,
) -> None:
    """The stdlib ProcessPoolExecutor with safepool's worker set-up catches every BaseException
    a task raises, WorkerTerminated too: the task fails with TaskAborted after its cleanup, the
    worker lives on, and the next SIGTERM (default action) breaks the whole executor."""
    setup = WorkerSetup(context=method)
    ready = setup.queue("ready")
    setup.event("never")
    cleaned = setup.add("cleaned", setup.context.SimpleQueue())
    kwargs = setup.pool_kwargs()
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=setup.context, **kwargs) as executor:
        future = executor.submit(workers_targets.report_and_block, 0)
        pid = ready.get(timeout=LONG)
        os.kill(pid, signal.SIGTERM)
        error = future.exception(LONG)
        assert isinstance(error, TaskAborted)
        assert error.exc_type == "safepool.WorkerTerminated"
        assert cleaned.get() == (pid, "WorkerTerminated")
        assert executor.submit(os.getpid).result(LONG) == pid  # the same worker
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not alive(pid), SHORT, "worker ended by the second SIGTERM")
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            executor.submit(os.getpid).result(LONG)


@pytest.mark.parametrize("method", START_METHODS)
def test_executor_sigterm_ends_the_worker_after_cleanup_and_fails_only_its_task(
    method: str,
) -> None:
    setup = WorkerSetup(context=method)
    ready = setup.queue("ready")
    setup.event("never")
    cleaned = setup.add("cleaned", setup.context.SimpleQueue())
    with setup.executor(1) as executor:
        future = executor.submit(workers_targets.report_and_block, 0)
        pid = ready.get(timeout=LONG)
        os.kill(pid, signal.SIGTERM)
        error = future.exception(LONG)
        assert isinstance(error, WorkerLost)
        assert (error.pid, error.exitcode) == (pid, TERMINATED_EXIT_CODE)
        assert cleaned.get() == (pid, "WorkerTerminated")
        replacement = executor.submit(os.getpid).result(LONG)
        assert replacement != pid
        os.kill(replacement, signal.SIGTERM)  # idle: it exits 143 and is replaced
        wait_until(lambda: not alive(replacement), SHORT, "the idle worker ended")
        assert executor.submit(os.getpid).result(LONG) not in (pid, replacement)


ASYNCIO_AFTER_SAFEPOOL = """
import sys
sys.path.insert(0, {tests!r})
import safepool
import asyncio  # after safepool: on 3.12+ its at-fork hook clears the wakeup fd in children
import workers_targets
with safepool.WorkerSetup(context="fork").Pool(1) as pool:
    print(pool.apply(workers_targets.fork_and_report)["wakeup_is_its_pipe"])
"""


def test_a_task_fork_keeps_its_watcher_when_asyncio_was_imported_after_safepool() -> None:
    """Import order decides which at-fork hook runs last; the worker's own registration must
    run after asyncio's (which clears the wakeup fd in every forked child on 3.12+)."""
    import subprocess
    import sys
    from pathlib import Path

    script = ASYNCIO_AFTER_SAFEPOOL.format(tests=str(Path(__file__).parent))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=LONG, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
