"""pytest plugin: a skipped test fails the run unless its reason names a missing optional dependency.

Allowed reasons are those of ``pytest.importorskip`` ("could not import 'x': ...") and of
``skip_missing_dependency`` ("missing optional dependency: x ..."). Anything else -- missing data, a
missing device, an unexplained ``pytest.skip`` -- silently loses coverage, so the session exits with
``TESTS_FAILED`` and lists the offending tests. Registered by ``tests/conftest.py``.
"""

from __future__ import annotations

import re

import pytest

ALLOWED_REASON = re.compile(r"^(Skipped: )?(could not import |missing optional dependency: )")


def skip_missing_dependency(name: str, why: str = "") -> None:
    """Skip the calling test because optional dependency ``name`` is absent (an allowed reason)."""
    pytest.skip(f"missing optional dependency: {name}{f' ({why})' if why else ''}")


class SkipPolicy:
    """Per-session record of skips whose reason is not an allowed one."""

    def __init__(self) -> None:
        self.unexplained: list[tuple[str, str]] = []

    def _record(self, report) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not ALLOWED_REASON.match(reason):
            self.unexplained.append((report.nodeid, reason))

    def pytest_runtest_logreport(self, report) -> None:
        self._record(report)

    def pytest_collectreport(self, report) -> None:
        self._record(report)

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.unexplained and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.unexplained:
            terminalreporter.section("skipped without naming a missing optional dependency (fails the run)", red=True)
            for nodeid, reason in self.unexplained:
                terminalreporter.line(f"{nodeid}: {reason}")


def pytest_configure(config) -> None:
    config.pluginmanager.register(SkipPolicy(), "hope-scale-skip-policy")
