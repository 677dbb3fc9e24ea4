"""msgpack at the boundary: compact, schemaless arrays validated into strict models.

msgpack rather than CBOR: the C extension is several times faster on the per-message
path, its encoding of small arrays, short strings and bin is as compact as CBOR's,
and implementations exist everywhere we run (a ~300-line decoder for the browser).
Only arrays, ints, bools, nil, str and bin are used; maps and extension types are
refused, so each object has one canonical encoding.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from fieldchat.schemas.errors import LimitExceeded, WireError

T = TypeVar("T", bound=BaseModel)

MAX_OBJECT_BYTES = 65_536


def no_ext(_code: int, _data: bytes) -> Any:
    """``ext_hook`` refusing msgpack extension types."""
    raise WireError("msgpack extension types are not used")


_local = threading.local()


def pack(value: Any) -> bytes:
    """Encode arrays of ints, bools, None, str and bytes.

    A Packer per thread is reused: a third of the cost of ``packb`` on short messages.
    """
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    return packer.pack(value)


def unpack(data: bytes, what: str) -> Any:
    """Decode one msgpack object with nothing trailing.

    Raises:
        WireError: not msgpack, trailing bytes, maps or extension types.
        LimitExceeded: longer than MAX_OBJECT_BYTES.
    """
    if len(data) > MAX_OBJECT_BYTES:
        raise LimitExceeded(f"{what} of {len(data)} bytes exceeds {MAX_OBJECT_BYTES}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            ext_hook=no_ext,
            max_map_len=0,
        )
    except WireError:
        raise
    # Boundary mapping: msgpack raises a zoo of exceptions (ExtraData, FormatError,
    # StackError, ValueError, UnicodeDecodeError, TypeError) for bad input.
    except Exception as exc:
        raise WireError(f"{what} is not valid msgpack") from exc
    return value


def fields(value: Any, count: int, what: str) -> tuple[Any, ...]:
    """Check that a decoded value is an array of exactly ``count`` items.

    Raises:
        WireError: another shape.
    """
    if not isinstance(value, tuple) or len(value) != count:
        raise WireError(f"{what} must be an array of {count} items")
    return value


def build(model: type[T], what: str, **values: Any) -> T:
    """Validate decoded values into a strict model, mapping validation errors.

    Raises:
        WireError: a value of the wrong type or out of range.
    """
    try:
        return model(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise WireError(f"invalid {what}: {where}: {first['msg']}") from None
