"""Base class of the strict, immutable wire models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class WireModel(BaseModel):
    """Frozen, no extra fields, no type coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
