"""Time limits for a test run that must end (benchmarks/run_gpu.sh on a lent GPU), without pytest-timeout: hooks that
tests/conftest.py imports, driven by environment variables.

``IK_FAST_TEST_TIMEOUT``
    Seconds per test (setup, call and teardown together). A test still running then fails with
    :class:`TimeLimitExceeded` and the next one runs. Python code is interrupted by SIGALRM; a test stuck in native
    code (a kernel that never returns) cannot be, so after a grace period (the limit, between 5 and 60 s) faulthandler
    writes every thread's stack (to ``<IK_FAST_TEST_PROGRESS>.stacks`` when that is set: pytest captures stderr)
    and ends the process; run_gpu.sh then runs the tests not yet run.
``IK_FAST_TEST_DEADLINE``
    A Unix time: no test starts after it (each is skipped, saying why), and a running one fails then.
``IK_FAST_TEST_PROGRESS``
    A file that gets one JSON line per event, written as it happens (even without the limits): ``{"event": "start",
    "nodeid": ...}`` when a test starts, ``{"event": "report", "nodeid", "when", "outcome", "duration", "message"}``
    for each of its phases and ``{"event": "done", "nodeid": ...}`` when it ends. A process that dies midway leaves
    every finished test's outcome and the id of the test it died in.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time

import pytest

__all__ = [
    "TimeLimitExceeded",
    "pytest_runtest_protocol",
    "pytest_runtest_setup",
    "pytest_runtest_call",
    "pytest_runtest_teardown",
    "pytest_runtest_logreport",
]


def _seconds(name):
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise pytest.UsageError(f"{name} must be a number of seconds, got {value!r}") from None


_TEST_TIMEOUT = _seconds("IK_FAST_TEST_TIMEOUT")
_TEST_DEADLINE = _seconds("IK_FAST_TEST_DEADLINE")
_TEST_PROGRESS = os.environ.get("IK_FAST_TEST_PROGRESS")
_in_test = {"id": None, "limit": 0.0, "over": False, "phase": False}
_stacks = []  # the file faulthandler writes to (kept open: it writes from a C thread)


def _stacks_file():
    if not _stacks:
        _stacks.append(open(f"{_TEST_PROGRESS}.stacks", "w") if _TEST_PROGRESS else sys.__stderr__)
    return _stacks[0]


class TimeLimitExceeded(Exception):
    """Raised in a test that ran past IK_FAST_TEST_TIMEOUT or IK_FAST_TEST_DEADLINE."""


def _on_alarm(signum, frame):
    if _in_test["id"] is None or _in_test["over"]:
        return
    if not _in_test["phase"]:  # in pytest's own code between setup, call and teardown: raise in the next phase
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        return
    _in_test["over"] = True
    raise TimeLimitExceeded(
        f"{_in_test['id']} ran past its time limit of {_in_test['limit']:.0f} s "
        f"(IK_FAST_TEST_TIMEOUT / IK_FAST_TEST_DEADLINE)"
    )


def _progress(event, nodeid, **fields):
    if _TEST_PROGRESS:
        with open(_TEST_PROGRESS, "a") as f:
            f.write(json.dumps({"event": event, "nodeid": nodeid, **fields}) + "\n")


def pytest_runtest_logreport(report):
    if _TEST_PROGRESS:
        message = ""
        if report.failed:
            message = report.longreprtext[-3000:]
        elif report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        _progress(
            "report", report.nodeid, when=report.when, outcome=report.outcome, duration=report.duration, message=message
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _progress("start", item.nodeid)
    if _TEST_TIMEOUT is None and _TEST_DEADLINE is None:
        yield
        _progress("done", item.nodeid)
        return
    limits = [
        t for t in (_TEST_TIMEOUT, None if _TEST_DEADLINE is None else _TEST_DEADLINE - time.time()) if t is not None
    ]
    limit = max(1.0, min(limits))
    _in_test.update(id=item.nodeid, limit=limit, over=False)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    faulthandler.dump_traceback_later(limit + min(60.0, max(5.0, limit)), exit=True, file=_stacks_file())
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, old)
        _in_test["id"] = None
        _progress("done", item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    _in_test["phase"] = True
    try:
        if _TEST_DEADLINE is not None and time.time() > _TEST_DEADLINE:
            pytest.skip("not run: the time for tests (IK_FAST_TEST_DEADLINE) was spent")
        yield
    finally:
        _in_test["phase"] = False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _in_test["phase"] = True
    try:
        yield
    finally:
        _in_test["phase"] = False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    _in_test["phase"] = True
    try:
        yield
    finally:
        _in_test["phase"] = False
