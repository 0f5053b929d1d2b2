"""pytest's FAILURES section in linear time, for a benchmark with many wrong answers.

For each failure it prints, pytest looks for the test's teardown output by scanning every
report of the passed setups and teardowns (``stats[""]``, two per test): quadratic in
the number of tests. 527 failing cases of 2,000 spent 1.8 s at the session's end with
one process and 4.6-5.2 s with ``-n 8`` (pytest 9.2; pytest issue #13360).

While pytest's summary sections print, and only when more than :data:`MANY` tests
failed, :class:`LinearFailures` hands pytest ``stats[""]`` reduced to the only reports
that scan can print: teardowns with teardown output. The output is the same, byte for
byte; the full list is back before the session's last line (the counts) is written.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

#: more failures than this: the summary scans the reduced list
MANY = 50


def _teardown_output(report: Any) -> bool:
    """A teardown report with a teardown section (captured output or log): what
    pytest prints under a failure, besides the failure itself."""
    if getattr(report, "when", None) != "teardown":
        return False
    return any("teardown" in name for name, _ in getattr(report, "sections", ()))


class LinearFailures:
    """Registered in the controller (see the module docstring)."""

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_terminal_summary(
        self, terminalreporter: pytest.TerminalReporter
    ) -> Generator[None, None, None]:
        stats = terminalreporter.stats
        phases = stats.get("")
        if phases is None or len(stats.get("failed", ())) <= MANY:
            return (yield)
        kept = [r for r in phases if _teardown_output(r)]
        stats[""] = kept
        try:
            return (yield)
        finally:
            # anything added meanwhile stays, after the full list
            stats[""] = phases + stats.get("", kept)[len(kept) :]
