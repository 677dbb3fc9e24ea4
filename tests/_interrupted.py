"""A pydantic model whose dump is cut by a stop signal: pydantic-core raises
PydanticSerializationError for the KeyboardInterrupt the handler raises inside its
serializer, as when a Ctrl-C came while ``DeviceSettings.load`` dumped a Path (CI)."""

from __future__ import annotations

import signal
from pathlib import Path

from pydantic import BaseModel, field_serializer


class StoppedWhileDumped(BaseModel):
    """``model_dump()`` raises ``signum`` in this process from inside the serializer."""

    path: Path
    signum: int = signal.SIGINT

    @field_serializer("path")
    def _as_text(self, path: Path) -> str:
        signal.raise_signal(self.signum)
        return str(path)
