"""HTTP routes of the ingestion package."""

from fastapi import APIRouter

router = APIRouter(tags=["ingestion"])
