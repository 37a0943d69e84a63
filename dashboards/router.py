"""HTTP routes of the dashboards package."""

from fastapi import APIRouter

router = APIRouter(tags=["dashboards"])
