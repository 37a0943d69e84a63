"""HTTP routes of the loyalty package."""

from fastapi import APIRouter

router = APIRouter(tags=["loyalty"])
