"""Scheduled jobs of the dashboards package."""

from cdp.scheduler import JobSpec

JOBS: tuple[JobSpec, ...] = ()
