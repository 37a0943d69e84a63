"""Scheduled jobs of the loyalty package."""

from cdp.scheduler import JobSpec

JOBS: tuple[JobSpec, ...] = ()
