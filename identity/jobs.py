"""Scheduled jobs of the identity package."""

from cdp.scheduler import JobSpec

JOBS: tuple[JobSpec, ...] = ()
