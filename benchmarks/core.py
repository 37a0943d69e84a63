"""The benchmark protocol and its result format."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class Measure:
    """One measured figure: the project's and the reference's, in the same unit."""

    name: str
    unit: str
    project: float
    reference: float | None = None
    reference_name: str | None = None
    higher_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        """How many times the reference's cost the project's costs (>1 means slower)."""
        if self.reference in (None, 0) or self.project == 0:
            return None
        assert self.reference is not None
        if self.higher_is_better:
            return self.reference / self.project
        return self.project / self.reference


@dataclass(slots=True)
class Result:
    """What a benchmark run reports."""

    benchmark: str
    scale: int
    measures: list[Measure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # Any: free-form JSON
    peak_rss_mib: float = 0.0

    def add(self, measure: Measure) -> Measure:
        """Record a measure."""
        self.measures.append(measure)
        return measure

    def to_json(self) -> dict[str, Any]:  # Any: JSON
        """The result as JSON-ready data."""
        data = asdict(self)
        for m, raw in zip(self.measures, data["measures"], strict=True):
            raw["ratio"] = m.ratio
        return data

    def render(self) -> str:
        """A human-readable table of the measures."""
        lines = [f"== {self.benchmark} (scale {self.scale:,}) =="]
        for m in self.measures:
            ref = (
                f"{m.reference:,.3f} {m.unit} ({m.reference_name})"
                if m.reference is not None
                else "no reference"
            )
            ratio = f"ratio {m.ratio:.2f}x" if m.ratio is not None else ""
            lines.append(f"  {m.name}: {m.project:,.3f} {m.unit}  vs  {ref}  {ratio}")
        for key, value in self.details.items():
            lines.append(f"  {key}: {value}")
        lines.append(f"  peak RSS: {self.peak_rss_mib:,.0f} MiB")
        return "\n".join(lines)


Benchmark = Callable[[int, Path], Result]


@contextmanager
def timer() -> Iterator[Callable[[], float]]:
    """Measure wall time of a block; call the yielded function after the block for seconds."""
    start = time.perf_counter()
    end: list[float] = []
    try:
        yield lambda: (end[0] if end else time.perf_counter()) - start
    finally:
        end.append(time.perf_counter())


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 1024 if sys.platform != "darwin" else usage / (1024 * 1024)


def write_json(result: Result, path: Path) -> None:
    """Save a result as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2, default=str))
