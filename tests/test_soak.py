"""A short soak (bench/soak.py): thousands of logins, reconnects and upgrades, then the server's
open files and asyncio tasks are back where they were before the first device connected."""

from __future__ import annotations

import pytest

from bench import soak

# Above the baseline, at most: a task or a file left behind per connection or per upgrade would
# be hundreds here.
SLACK = 3


@pytest.mark.timeout(300)  # the suite's 120 s per test is for tests that do not run for minutes
def test_two_minutes_of_churn_leak_no_tasks_and_no_files() -> None:
    result = soak.report(soak.run(devices=100, minutes=2, every=10))
    assert result["rounds"] >= 3 and result["upgraded"] >= 200, result
    before, after = result["baseline"], result["afterDevicesLeft"]
    assert after["tasks"] <= before["tasks"] + SLACK, result
    assert after["fds"] <= before["fds"] + SLACK, result
