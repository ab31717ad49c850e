"""Catalog calls for services that speak refusals (a transitional shim).

The pipeline, artifact and upload services catch `csml.refusals.Refusal` only. The
catalog (`csml.coordinator.catalog`) is moving from `ApiError` to refusals on another
branch; until it has, these wrappers re-raise its `ApiError` as the refusal kind of the
same status (through `errors.STATUS`), keeping code, message, field and details, and
pass refusals through unchanged. Once the catalog raises refusals itself they are
plain calls: replace them with the catalog's methods and delete this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from csml import refusals
from csml.coordinator.errors import STATUS, ApiError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from csml.coordinator.catalog import Catalog, CatalogEntry
    from csml.schemas import OperationInfo

_KIND: dict[int, type[refusals.Refusal]] = {}
for _kind, _status in STATUS.items():
    _KIND.setdefault(_status, _kind)


def as_refusal(exc: ApiError) -> refusals.Refusal:
    """The refusal an `ApiError` of the catalog stands for."""
    kind = _KIND.get(exc.status, refusals.Invalid)
    return kind(exc.code, exc.message, field=exc.field, details=exc.details)


def entry(catalog: Catalog, app: str) -> CatalogEntry:
    """`catalog.get`: NotFound for an unknown app."""
    try:
        return catalog.get(app)
    except ApiError as exc:
        raise as_refusal(exc) from None


def operation(
    catalog: Catalog, app: str, name: str, session: Session | None = None
) -> tuple[CatalogEntry, OperationInfo]:
    """`catalog.operation`: NotFound for an unknown app or operation."""
    try:
        return catalog.operation(app, name, session)
    except ApiError as exc:
        raise as_refusal(exc) from None


def check_params(catalog: Catalog, app: str, name: str, params: dict[str, Any]) -> None:
    """`catalog.check_params`: Invalid for params its schema refuses."""
    try:
        catalog.check_params(app, name, params)
    except ApiError as exc:
        raise as_refusal(exc) from None
