"""Typed reads of a device's own state record (a Flower ``ConfigRecord``): a field of the wrong
type is a :class:`DeviceStateError`, never a silent conversion."""

from __future__ import annotations

from typing import Any, TypeVar

from flwr.app import ConfigRecord

__all__ = ["DeviceStateError", "blob", "blobs", "integer", "integers", "num", "text",
           "export_record", "restore_record"]

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


def _out(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"hex": v.hex()}
    if isinstance(v, list):
        return [_out(x) for x in v]
    if isinstance(v, bool | int | float | str):
        return v
    raise DeviceStateError(f"device state value of type {type(v).__name__} cannot be exported")


def _in(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) != {"hex"} or not isinstance(v["hex"], str):
            raise DeviceStateError("exported device state holds an unknown object")
        return bytes.fromhex(v["hex"])
    if isinstance(v, list):
        return [_in(x) for x in v]
    if isinstance(v, bool | int | float | str):
        return v
    raise DeviceStateError(f"exported device state holds a {type(v).__name__}")


def export_record(st: ConfigRecord) -> dict[str, Any]:
    """The whole state record as JSON-able data (bytes as hex; int, float and bool kept
    apart), for a device's encrypted store: a SuperNode restarted without its node state
    restores it with :func:`restore_record`."""
    return {str(k): _out(v) for k, v in st.items()}


def restore_record(data: Any) -> ConfigRecord:
    """Inverse of :func:`export_record` (a foreign or damaged export: DeviceStateError)."""
    if not isinstance(data, dict):
        raise DeviceStateError("exported device state is not a mapping")
    return ConfigRecord({str(k): _in(v) for k, v in data.items()})
