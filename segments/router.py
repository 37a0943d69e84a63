"""HTTP routes of the segments package."""

from fastapi import APIRouter

router = APIRouter(tags=["segments"])
