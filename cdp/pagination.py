"""Pagination shared by every list endpoint."""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

MAX_LIMIT = 1000

T = TypeVar("T")


class PageParams(BaseModel):
    """Offset pagination parameters of a list request."""

    model_config = ConfigDict(frozen=True)

    limit: int = 50
    offset: int = 0


def page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page")] = 50,
    offset: Annotated[int, Query(ge=0, description="Items to skip")] = 0,
) -> PageParams:
    """Read `limit` and `offset` from the query string."""
    return PageParams(limit=limit, offset=offset)


PageDep = Annotated[PageParams, Depends(page_params)]


class Page(BaseModel, Generic[T]):
    """One page of a list: its items, the total and where the next page starts."""

    items: list[T]
    total: int
    limit: int
    offset: int
    next_offset: int | None

    @classmethod
    def of(cls, items: list[T], *, total: int, params: PageParams) -> Page[T]:
        """Build a page from its items and the total count."""
        end = params.offset + len(items)
        return cls(
            items=items,
            total=total,
            limit=params.limit,
            offset=params.offset,
            next_offset=end if end < total else None,
        )


def paginate(
    session: Session,
    query: Select[T],
    *order_by: Any,  # Any: SQLAlchemy order-by clauses
    limit: int,
    offset: int,
) -> tuple[list[T], int]:
    """One page of ORM rows of `query` in `order_by` order, and the total count."""
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(*order_by).limit(limit).offset(offset)).all()
    return list(rows), total
