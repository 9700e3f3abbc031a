"""A pytest plugin (loaded by conftest.py): with ``KFS_FORBID_IMPORT_SKIPS=1`` (as `.ci/run` sets it), a test or
module skipped because a package could not be imported (`pytest.importorskip`) fails the run.

Everything the tests import is in the ``test`` extra (or installed by `.ci/run`), so in CI such a skip is a
broken install, never a choice: without this a missing package would turn whole modules into skips while the
run stayed green. Locally (the variable unset) the skips stay skips, listed by ``-rs``.
"""

import os
import re

import pytest

ENVIRONMENT = "KFS_FORBID_IMPORT_SKIPS"
_IMPORT_SKIP = re.compile(r"could not import '([^']+)'")


def import_skips(reports) -> list[tuple[str, str]]:
    """``(where, reason)`` of each skip report that `pytest.importorskip` raised."""
    found = []
    for report in reports:
        longrepr = getattr(report, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        if _IMPORT_SKIP.search(reason):
            found.append((report.nodeid or str(longrepr[0]), reason.removeprefix("Skipped: ")))
    return found


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if os.environ.get(ENVIRONMENT, "") in ("", "0"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or hasattr(session.config, "workerinput"):  # an xdist worker: the controller checks
        return
    skips = import_skips(reporter.stats.get("skipped", []))
    if not skips:
        return
    missing = sorted({_IMPORT_SKIP.search(reason).group(1) for _, reason in skips})
    reporter.write_sep("=", f"{ENVIRONMENT}: {len(skips)} skipped for a package that could not be imported", red=True)
    for where, reason in skips:
        reporter.write_line(f"{where}: {reason}")
    reporter.write_line(
        f"Install what the `test` extra lists (pip install -e '.[test]'), then check `import {missing[0]}`: "
        f"{', '.join(missing)} must import in CI."
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
