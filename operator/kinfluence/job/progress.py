"""Progress of a job: a tracker (blocks done, rate, ETA) and the reporters that show it —
a progress bar on a terminal, a rate-limited callback in a cluster (status patches)."""

from __future__ import annotations

import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable, Optional, TextIO


@dataclass(frozen=True)
class ProgressSnapshot:
    """Where a job stands: blocks of the (test chunk x train chunk) grid done, and how fast."""

    stage: str
    completed_blocks: int = 0
    total_blocks: int = 0
    resumed_blocks: int = 0  # done by an earlier run, skipped in this one
    elapsed_seconds: float = 0.0
    rate: Optional[float] = None  # blocks per second in this run
    eta_seconds: Optional[float] = None

    @property
    def percentage(self) -> float:
        return 100.0 * self.completed_blocks / self.total_blocks if self.total_blocks else 0.0

    @property
    def done(self) -> bool:
        return self.total_blocks > 0 and self.completed_blocks >= self.total_blocks

    def to_status(self, now: Optional[datetime] = None) -> dict[str, Any]:
        """The InfluenceJob `status.progress` object (camelCase)."""
        now = now or datetime.now(timezone.utc)
        out: dict[str, Any] = {
            "completedBlocks": self.completed_blocks,
            "totalBlocks": self.total_blocks,
            "percentage": round(self.percentage, 2),
            "lastUpdateTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if self.eta_seconds is not None:
            out["estimatedRemainingSeconds"] = round(self.eta_seconds, 1)
        return out


class ProgressTracker:
    """Turns (blocks done) observations into snapshots with a rate and an ETA.

    The rate counts only blocks finished in this run (resumed ones cost nothing), averaged
    since the first observation: rate = (done - done_0) / (t - t_0), ETA = remaining / rate.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._t0 = clock()
        self._start: Optional[tuple[float, int]] = None
        self._last = ProgressSnapshot(stage="starting")

    @property
    def last(self) -> ProgressSnapshot:
        return self._last

    def stage(self, name: str) -> ProgressSnapshot:
        self._last = replace(self._last, stage=name, elapsed_seconds=self._clock() - self._t0)
        return self._last

    def update(self, completed: int, total: int) -> ProgressSnapshot:
        now = self._clock()
        if self._start is None:
            self._start = (now, completed)
            resumed = completed
        else:
            resumed = self._last.resumed_blocks
        t_start, done_start = self._start
        done_here = completed - done_start
        rate = done_here / (now - t_start) if done_here > 0 and now > t_start else None
        eta = (total - completed) / rate if rate else (0.0 if completed >= total else None)
        self._last = ProgressSnapshot(
            stage=self._last.stage,
            completed_blocks=completed,
            total_blocks=total,
            resumed_blocks=resumed,
            elapsed_seconds=now - self._t0,
            rate=rate,
            eta_seconds=eta,
        )
        return self._last


class ProgressReporter(ABC):
    """What the runner tells about a job: stages, block progress, the end."""

    @abstractmethod
    def stage(self, snapshot: ProgressSnapshot, detail: str = "") -> None:
        """A new stage began (loading, fitting, computing, ...)."""

    @abstractmethod
    def progress(self, snapshot: ProgressSnapshot) -> None:
        """More blocks are done."""

    @abstractmethod
    def finish(self, snapshot: ProgressSnapshot, ok: bool, message: str = "") -> None:
        """The job ended (ok, or failed/interrupted with a message)."""


class NullReporter(ProgressReporter):
    """Reports nothing."""

    def stage(self, snapshot: ProgressSnapshot, detail: str = "") -> None:
        pass

    def progress(self, snapshot: ProgressSnapshot) -> None:
        pass

    def finish(self, snapshot: ProgressSnapshot, ok: bool, message: str = "") -> None:
        pass


class CallbackReporter(ProgressReporter):
    """Calls `callback(snapshot)` at most once per `min_interval` seconds (stage changes and
    the end always pass): what the in-cluster runner uses to patch the InfluenceJob status."""

    def __init__(
        self,
        callback: Callable[[ProgressSnapshot], None],
        min_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.callback = callback
        self.min_interval = min_interval
        self._clock = clock
        self._last_sent: Optional[float] = None
        self._lock = threading.Lock()

    def _send(self, snapshot: ProgressSnapshot, force: bool) -> None:
        with self._lock:
            now = self._clock()
            if not force and self._last_sent is not None and now - self._last_sent < self.min_interval:
                return
            self._last_sent = now
        self.callback(snapshot)

    def stage(self, snapshot: ProgressSnapshot, detail: str = "") -> None:
        self._send(snapshot, force=True)

    def progress(self, snapshot: ProgressSnapshot) -> None:
        self._send(snapshot, force=snapshot.done)

    def finish(self, snapshot: ProgressSnapshot, ok: bool, message: str = "") -> None:
        self._send(snapshot, force=True)


def format_seconds(seconds: Optional[float]) -> str:
    """1h02m03s / 4m05s / 6s, or '?' when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class TerminalReporter(ProgressReporter):
    """A rich progress bar (blocks, rate, ETA) on a terminal; plain lines otherwise."""

    def __init__(self, stream: TextIO = sys.stderr, line_interval: float = 10.0) -> None:
        from rich.console import Console

        self.console = Console(file=stream, highlight=False, soft_wrap=True)
        self.line_interval = line_interval
        self._bar: Any = None
        self._task: Any = None
        self._last_line: Optional[float] = None

    def stage(self, snapshot: ProgressSnapshot, detail: str = "") -> None:
        self._stop_bar()
        self.console.print(f"[bold]{snapshot.stage}[/bold]{': ' + detail if detail else ''}")

    def _start_bar(self, snapshot: ProgressSnapshot) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("blocks"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task("blocks", total=snapshot.total_blocks, completed=snapshot.completed_blocks, rate="", eta="?")

    def _stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def progress(self, snapshot: ProgressSnapshot) -> None:
        rate = f"{snapshot.rate:.2f} blocks/s" if snapshot.rate else ""
        eta = format_seconds(snapshot.eta_seconds)
        if self.console.is_terminal:
            if self._bar is None:
                self._start_bar(snapshot)
            self._bar.update(self._task, completed=snapshot.completed_blocks, total=snapshot.total_blocks, rate=rate, eta=eta)
            return
        now = time.monotonic()
        if snapshot.done or self._last_line is None or now - self._last_line >= self.line_interval:
            self._last_line = now
            self.console.print(
                f"blocks {snapshot.completed_blocks}/{snapshot.total_blocks} ({snapshot.percentage:.1f}%)"
                f"{', ' + rate if rate else ''}, ETA {eta}"
            )

    def finish(self, snapshot: ProgressSnapshot, ok: bool, message: str = "") -> None:
        self._stop_bar()
        if message:
            self.console.print(message)
