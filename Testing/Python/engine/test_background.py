"""Background jobs: progress, results, cancel and failure handed to the polling thread."""
from __future__ import annotations

import pytest

from TuckerSegmentLib.background import CANCELLED, DONE, FAILED, BackgroundJob
from TuckerSegmentLib.errors import Cancelled
from TuckerSegmentLib.progress import check_cancel


def test_background_job_reports_progress_returns_results_and_stops_on_cancel():
    seen = []

    def work(progress, cancelled):
        for step in range(5):
            progress(step / 5, f"step {step}")
            seen.append(step)
        return "result"
    job = BackgroundJob(work)
    assert job.wait(10) == DONE and job.outcome() == "result" and job.progress() == (0.8, "step 4")
    assert seen == [0, 1, 2, 3, 4] and job.seconds >= 0

    def endless(progress, cancelled):
        while True:
            check_cancel(cancelled, "endless work")
    job = BackgroundJob(endless)
    job.cancel()
    assert job.wait(10) == CANCELLED
    with pytest.raises(Cancelled, match="endless work cancelled"):
        job.outcome()
    failing = BackgroundJob(lambda progress, cancelled: 1 / 0)
    assert failing.wait(10) == FAILED and isinstance(failing.error, ZeroDivisionError)
