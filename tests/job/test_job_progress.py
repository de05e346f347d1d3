"""Progress: rate and ETA from block counts, the rate-limited callback, the terminal output."""

from __future__ import annotations

import io
from datetime import datetime, timezone

from kinfluence.job.progress import (
    CallbackReporter,
    ProgressSnapshot,
    ProgressTracker,
    TerminalReporter,
    format_seconds,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_and_eta_count_only_this_runs_blocks() -> None:
    clock = Clock()
    tracker = ProgressTracker(clock)
    first = tracker.update(4, 20)  # 4 blocks resumed from an earlier run
    assert (first.resumed_blocks, first.rate, first.eta_seconds, first.percentage) == (4, None, None, 20.0)
    clock.now += 8.0
    snap = tracker.update(8, 20)  # 4 blocks in 8 s: 0.5 blocks/s, 12 left: 24 s
    assert snap.rate == 0.5 and snap.eta_seconds == 24.0 and snap.resumed_blocks == 4
    clock.now += 24.0
    end = tracker.update(20, 20)
    assert end.done and end.eta_seconds == 0.0 and end.percentage == 100.0
    assert tracker.stage("done").stage == "done" and tracker.last.completed_blocks == 20


def test_status_object_for_the_operator() -> None:
    snap = ProgressSnapshot(stage="computing", completed_blocks=1, total_blocks=3, eta_seconds=12.345)
    status = snap.to_status(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert status == {"completedBlocks": 1, "totalBlocks": 3, "percentage": 33.33,
                      "estimatedRemainingSeconds": 12.3, "lastUpdateTime": "2026-01-02T03:04:05Z"}
    assert "estimatedRemainingSeconds" not in ProgressSnapshot(stage="x").to_status()


def test_callback_reporter_is_rate_limited_but_never_drops_stages_or_the_end() -> None:
    clock = Clock()
    sent: list[ProgressSnapshot] = []
    reporter = CallbackReporter(sent.append, min_interval=5.0, clock=clock)
    reporter.stage(ProgressSnapshot(stage="fitting"))
    for done in range(1, 10):
        clock.now += 1.0
        reporter.progress(ProgressSnapshot(stage="computing", completed_blocks=done, total_blocks=10))
    clock.now += 0.1
    reporter.progress(ProgressSnapshot(stage="computing", completed_blocks=10, total_blocks=10))
    reporter.finish(ProgressSnapshot(stage="done", completed_blocks=10, total_blocks=10), ok=True)
    assert [(s.stage, s.completed_blocks) for s in sent] == [
        ("fitting", 0), ("computing", 5), ("computing", 10), ("done", 10)]


def test_terminal_reporter_prints_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    reporter = TerminalReporter(stream=out, line_interval=3600)
    reporter.stage(ProgressSnapshot(stage="fitting"), "direct on 40 training points")
    reporter.progress(ProgressSnapshot(stage="computing", completed_blocks=1, total_blocks=4, rate=2.0, eta_seconds=1.5))
    reporter.progress(ProgressSnapshot(stage="computing", completed_blocks=2, total_blocks=4))  # within the interval
    reporter.progress(ProgressSnapshot(stage="computing", completed_blocks=4, total_blocks=4, rate=2.0, eta_seconds=0.0))
    reporter.finish(ProgressSnapshot(stage="done"), ok=True, message="done: 4 blocks")
    lines = out.getvalue().splitlines()
    assert lines == [
        "fitting: direct on 40 training points",
        "blocks 1/4 (25.0%), 2.00 blocks/s, ETA 2s",
        "blocks 4/4 (100.0%), 2.00 blocks/s, ETA 0s",
        "done: 4 blocks",
    ]


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (None, 4.4, 65, 3723)] == ["?", "4s", "1m05s", "1h02m03s"]
