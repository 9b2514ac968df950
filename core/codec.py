"""msgpack encoding of the records, for where they leave Ray: buffer snapshots in checkpoints, HTTP
bodies, data-preparation progress files. Never pickle: decoding builds only the known record types.

A record encodes as a map of its fields; numpy arrays as (dtype, shape, raw bytes); nested records
and tuples of records recursively, guided by the dataclass field types.
"""

from __future__ import annotations

import dataclasses
import typing
from functools import cache
from typing import Any, TypeVar

import msgpack
import numpy as np

from core import records

T = TypeVar("T")
_NDARRAY = 1


def encode(record: Any) -> bytes:
    return msgpack.packb(_to_plain(record), use_bin_type=True, default=_default)


def decode(data: bytes, cls: type[T]) -> T:
    plain = msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)
    return _from_plain(plain, cls)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        header = msgpack.packb([value.dtype.str, list(value.shape)])
        return msgpack.ExtType(_NDARRAY, header + np.ascontiguousarray(value).tobytes())
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    assert code == _NDARRAY, code
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    dtype, shape = next(unpacker)
    offset = unpacker.tell()
    return np.frombuffer(data[offset:], dtype=np.dtype(dtype)).reshape(shape).copy()


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(records))


def _from_plain(plain: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(plain, dict):
            raise ValueError(f"expected a mapping for {tp.__name__}, got {type(plain).__name__}")
        hints = _hints(tp)
        return tp(**{k: _from_plain(v, hints[k]) for k, v in plain.items() if k in hints})
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_plain(v, args[0]) for v in plain)
        return tuple(_from_plain(v, a) for v, a in zip(plain, args))
    if origin is list:
        (arg,) = typing.get_args(tp)
        return [_from_plain(v, arg) for v in plain]
    return plain
