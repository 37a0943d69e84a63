"""Scheduled jobs of the segments package."""

from cdp.scheduler import JobSpec

JOBS: tuple[JobSpec, ...] = ()
