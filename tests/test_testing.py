"""The test helpers' own contract: ``rpicluster.testing.wait_until``, the one way tests wait."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rpicluster.testing import wait_until


def test_wait_until_returns_the_conditions_value_once_it_holds():
    calls = iter([None, 0, "", {"blocks_done": 2}])
    assert wait_until(lambda: next(calls), 10, what="a value", interval=0) == {"blocks_done": 2}


def test_wait_until_names_what_it_waited_for_and_the_last_ignored_error():
    def not_yet():
        raise ValueError("caught mid-write")

    with pytest.raises(AssertionError, match=r"^waited 0.2 s for the store's first block "
                                             r"\(last: ValueError\('caught mid-write'\)\)$"):
        wait_until(not_yet, 0.2, what="the store's first block", ignore=ValueError)
    with pytest.raises(KeyError):       # not in ``ignore``: a bug in the test, raised at once
        wait_until(lambda: {}["x"], 10, what="x", ignore=ValueError)


@pytest.mark.timeout(120)   # far below the wait's own 600 s: only the exit can end it in time
def test_a_process_that_exits_ends_the_wait_at_once_with_its_output():
    proc = subprocess.Popen([sys.executable, "-c", "print('no store given'); raise SystemExit(2)"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with pytest.raises(AssertionError, match=r"^the process exited \(status 2\) before a "
                                             r"committed block: no store given\n$"):
        wait_until(lambda: False, 600, what="a committed block", process=proc)
