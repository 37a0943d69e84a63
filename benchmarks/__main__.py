"""Run a benchmark: `python -m benchmarks NAME --scale N [--json FILE]`."""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

from benchmarks.core import Benchmark, peak_rss_mib, write_json

# name -> module that defines `run(scale, workdir) -> Result`, and its default scale.
BENCHMARKS: dict[str, tuple[str, int]] = {
    "sample_data": ("benchmarks.sample_data", 1_000_000),
    "dashboards": ("benchmarks.dashboards", 1_000_000),
    "dashboards_sample": ("benchmarks.dashboards_sample", 1_000_000),
    "ingestion_files": ("benchmarks.ingestion_files", 5_000_000),
    "ingestion_http": ("benchmarks.ingestion_http", 200_000),
    "loyalty_backfill": ("benchmarks.loyalty_backfill", 1_000_000),
    "loyalty_realtime": ("benchmarks.loyalty_realtime", 60_000),
    "loyalty_realtime_ledger": ("benchmarks.loyalty_realtime_ledger", 1_000_000),
    "loyalty_jobs": ("benchmarks.loyalty_jobs", 100_000),
    "loyalty_sample": ("benchmarks.loyalty_sample", 1_000_000),
    "identity": ("benchmarks.identity", 1_000_000),
    "identity_quality": ("benchmarks.identity_quality", 20_000),
    "segments_attributes": ("benchmarks.segments_attributes", 200_000),
    "segments_rules": ("benchmarks.segments_rules", 200_000),
    "segments_sample": ("benchmarks.segments_sample", 20_000),
}


def load(name: str) -> Benchmark:
    """The run function of a benchmark."""
    module = importlib.import_module(BENCHMARKS[name][0])
    run: Benchmark = module.run
    return run


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one benchmark or all of them."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--scale", type=int, default=None, help="customers (default per bench)")
    parser.add_argument(
        "--json", type=Path, default=None, help="write results here (a folder for all)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where to put data")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    for name in names:
        scale = args.scale or BENCHMARKS[name][1]
        with tempfile.TemporaryDirectory(prefix=f"cdp-bench-{name}-") as tmp:
            workdir = args.workdir or Path(tmp)
            result = load(name)(scale, workdir)
            result.peak_rss_mib = peak_rss_mib()
        print(result.render())
        if args.json:
            target = args.json / f"{name}.json" if args.name == "all" else args.json
            write_json(result, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
