"""Tables of placement (see `csml.placement`).

- `placement_keys`: every requirement a job of an app was submitted with, once, by its
  key (`placement.key_of`), with the requirement itself. Claims match a worker's labels
  against these (a coordinator caches them, reloading when the app's largest `id`
  grows), so a job row holds only the key. A submission with the key stamps `used_at`
  (an upsert: it holds the row until it commits); the retention sweep drops keys no job
  refers to and unused for `KEY_TTL` (never one a submission in flight stamped).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from csml.store.tables import Base, SerialId


class PlacementKey(Base):
    __tablename__ = "placement_keys"

    id: Mapped[int] = mapped_column(SerialId, primary_key=True, autoincrement=True)
    app: Mapped[str] = mapped_column(String(40))
    key: Mapped[str] = mapped_column(String(64))
    requires: Mapped[dict[str, Any]]
    used_at: Mapped[datetime]

    __table_args__ = (
        UniqueConstraint("app", "key", name="uq_placement_keys_app_key"),
        Index("ix_placement_keys_app_id", "app", "id"),
    )
