"""Typed reads of a device's own state record (a Flower ``ConfigRecord``): a field of the wrong
type is a :class:`DeviceStateError`, never a silent conversion."""

from __future__ import annotations

from flwr.app import ConfigRecord

__all__ = ["DeviceStateError", "blob", "blobs", "integer", "integers", "num", "text"]


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


def integers(st: ConfigRecord, key: str) -> list[int]:
    v = st[key]
    if isinstance(v, list):
        out = [x for x in v if isinstance(x, int)]
        if len(out) == len(v):
            return out
    raise DeviceStateError(f"device state {key!r} is not a list of integers")


def blobs(st: ConfigRecord, key: str) -> list[bytes]:
    v = st[key]
    if isinstance(v, list):
        out = [x for x in v if isinstance(x, bytes)]
        if len(out) == len(v):
            return out
    raise DeviceStateError(f"device state {key!r} is not a list of bytes")
