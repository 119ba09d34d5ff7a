"""Typed reads of a device's own state record (a Flower ``ConfigRecord``): a field of the wrong
type is a :class:`DeviceStateError`, never a silent conversion."""

from __future__ import annotations

from typing import TypeVar

from flwr.app import ConfigRecord

__all__ = ["DeviceStateError", "blob", "blobs", "integer", "integers", "num", "text"]

T = TypeVar("T")


class DeviceStateError(RuntimeError):
    """The device's state record holds a field of the wrong type (corrupt or foreign state)."""


def num(st: ConfigRecord, key: str) -> float:
    v = st[key]
    if isinstance(v, bool | int | float):
        return float(v)
    raise DeviceStateError(f"device state {key!r} is not a number")


def integer(st: ConfigRecord, key: str) -> int:
    v = st[key]
    if isinstance(v, int):
        return int(v)
    raise DeviceStateError(f"device state {key!r} is not an integer")


def text(st: ConfigRecord, key: str) -> str:
    v = st[key]
    if isinstance(v, str):
        return v
    raise DeviceStateError(f"device state {key!r} is not text")


def blob(st: ConfigRecord, key: str) -> bytes:
    v = st[key]
    if isinstance(v, bytes):
        return v
    raise DeviceStateError(f"device state {key!r} is not bytes")


def _list_of(st: ConfigRecord, key: str, kind: type[T], what: str) -> list[T]:
    v = st[key]
    if isinstance(v, list):
        out: list[T] = [x for x in v if isinstance(x, kind)]
        if len(out) == len(v):
            return out
    raise DeviceStateError(f"device state {key!r} is not a list of {what}")


def integers(st: ConfigRecord, key: str) -> list[int]:
    return _list_of(st, key, int, "integers")


def blobs(st: ConfigRecord, key: str) -> list[bytes]:
    return _list_of(st, key, bytes, "bytes")
