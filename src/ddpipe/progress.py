"""Progress events: the library reports, whoever listens shows them.

The pipeline emits stage, shard and step events here; the CLI registers a terminal sink (tqdm bars);
other front ends may register their own. With no sink registered, emitting costs nothing.
"""

from __future__ import annotations

import threading
from typing import Protocol


class Sink(Protocol):
    def stage_started(self, stage: str, shards: int) -> None: ...
    def shard_finished(self, stage: str, shard: str, reused: bool) -> None: ...
    def step(self, stage: str, shard: str, done: int, total: int) -> None: ...
    def stage_finished(self, stage: str) -> None: ...


_sinks: list[Sink] = []
_lock = threading.Lock()


def add_sink(sink: Sink) -> None:
    with _lock:
        _sinks.append(sink)


def remove_sink(sink: Sink) -> None:
    with _lock:
        if sink in _sinks:
            _sinks.remove(sink)


def emit(event: str, *args) -> None:
    for sink in list(_sinks):
        getattr(sink, event)(*args)


def stepper(stage: str, shard: str, every: int = 1):
    """A ``progress(done, total)`` callback for long shards that emits a step event every ``every`` steps."""

    def progress(done: int, total: int) -> None:
        if _sinks and (done == total or done % every == 0):
            emit("step", stage, shard, done, total)

    return progress


class TerminalSink:
    """tqdm bars on stderr: one per stage (shards), one per long shard (steps)."""

    def __init__(self):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self._bars: dict = {}
        self._lock = threading.Lock()

    def stage_started(self, stage, shards):
        with self._lock:
            self._bars[stage] = self._tqdm(total=shards, desc=f"{stage:<12}", unit="shard", leave=True)

    def shard_finished(self, stage, shard, reused):
        with self._lock:
            bar = self._bars.get(stage)
            if bar is not None:
                bar.update(1)
                if reused:
                    bar.set_postfix_str("reused", refresh=False)
            step_bar = self._bars.pop((stage, shard), None)
            if step_bar is not None:
                step_bar.close()

    def step(self, stage, shard, done, total):
        with self._lock:
            bar = self._bars.get((stage, shard))
            if bar is None:
                bar = self._bars[(stage, shard)] = self._tqdm(
                    total=total, desc=f"  {shard:<10}", unit="step", leave=False
                )
            bar.n = done
            bar.refresh()

    def stage_finished(self, stage):
        with self._lock:
            bar = self._bars.pop(stage, None)
            if bar is not None:
                bar.close()
