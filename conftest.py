"""pytest settings for test_all.py: a skipped test fails the run, and the reasons are printed.

Every package the tests compare against is a test dependency (pyproject's `test` extra), so a skip can only mean a
broken install or a test that gave up; either way the suite must not come out green with an "s" in it. `-rs`
(pyproject's addopts) prints each skip's reason in the summary.

The suite runs in two processes (pytest-xdist, `-n 2 --dist loadscope`: a test class per process at a time), each
with one thread: two torch processes with a thread per core each would oversubscribe 2 cores tenfold.
"""

import os

if "PYTEST_XDIST_WORKER" in os.environ:  # before torch is imported by the test module
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.stats.get("skipped") and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped:
        terminalreporter.write_sep("=", f"{len(skipped)} skipped: the run fails (install the `test` extra: "
                                        f"pip install -e \".[test]\")", red=True)
