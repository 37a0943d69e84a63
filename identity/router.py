"""HTTP routes of the identity package."""

from fastapi import APIRouter

router = APIRouter(tags=["identity"])
