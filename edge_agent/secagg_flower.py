"""Flower ClientApp (Message API) running the device side of SecAgg+ (protocols.secagg).

One message type, ``query.secagg``, with a ConfigRecord ``{"stage", "payload", ...}``. The
device keeps its Ed25519 identity and the round state (private keys included) in its own
``context.state``; the coordinator only relays bytes. Inputs come from a provider named in
the message (``module:function(partition_id, length) -> Tensor``), so an application plugs
in its own vector (counts, gradients) without touching this adapter.
"""

from __future__ import annotations

import importlib

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from protocols.keys import IdentityKey
from protocols.secagg import RoundConfig
from protocols.secagg.client import SecAggClient

__all__ = ["app", "demo_input", "DEMO_INPUT"]

app = ClientApp()
_STATE = "secagg"
DEMO_INPUT = "edge_agent.secagg_flower:demo_input"


class SecAggDeviceError(RuntimeError):
    """The device got a SecAgg message it cannot act on (not enrolled, unknown stage)."""


def demo_input(partition_id: int, length: int) -> torch.Tensor:
    """A deterministic integer vector per device (tests and demos)."""
    return (torch.arange(length, dtype=torch.int64) - length // 2) * (partition_id + 1)


def _provider(ref: str):  # type: ignore[no-untyped-def]
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _st(context: Context) -> ConfigRecord:
    if _STATE not in context.state.config_records:
        context.state.config_records[_STATE] = ConfigRecord(
            {"identity": IdentityKey.generate().private_bytes()}
        )
    return context.state.config_records[_STATE]


def _reply(message: Message, **values: object) -> Message:
    return Message(RecordDict({"cfg": ConfigRecord(values)}), reply_to=message)  # type: ignore[arg-type]


@app.query("secagg")
def secagg(message: Message, context: Context) -> Message:
    """Advance this device's SecAgg+ state machine by one stage."""
    cfg = message.content.config_records["cfg"]
    stage = str(cfg["stage"])
    st = _st(context)
    identity = IdentityKey.from_private_bytes(bytes(st["identity"]))  # type: ignore[arg-type]
    if stage == "enrol":
        pid = int(context.node_config.get("partition-id", -1))  # type: ignore[arg-type]
        return _reply(message, identity=identity.public_bytes(), partition_id=pid)
    if stage == "advertise":
        st["config"] = bytes(cfg["config"])  # type: ignore[arg-type]
        st["registry"] = list(cfg["registry"])  # type: ignore[arg-type]
        st["index"] = int(cfg["index"])  # type: ignore[arg-type]
        client = SecAggClient(RoundConfig.from_bytes(st["config"]), st["index"], identity,
                              [bytes(b) for b in st["registry"]])  # type: ignore[union-attr]
        out = client.advertise_keys()
    else:
        if "state" not in st:
            raise SecAggDeviceError("no SecAgg round in progress on this device")
        client = SecAggClient.restore(
            RoundConfig.from_bytes(bytes(st["config"])),  # type: ignore[arg-type]
            int(st["index"]),  # type: ignore[arg-type]
            identity,
            [bytes(b) for b in st["registry"]],  # type: ignore[union-attr]
            bytes(st["state"]),  # type: ignore[arg-type]
        )
        payload = bytes(cfg["payload"])  # type: ignore[arg-type]
        if stage == "share_keys":
            out = client.share_keys(payload)
        elif stage == "masked_input":
            pid = int(context.node_config.get("partition-id", 0))  # type: ignore[arg-type]
            x = _provider(str(cfg["input"]))(pid, client.config.spec.length)
            out = client.masked_input(payload, x)
        elif stage == "unmask":
            out = client.unmask(payload)
        else:
            raise SecAggDeviceError(f"unknown SecAgg stage {stage!r}")
    st["state"] = client.export_state()
    return _reply(message, payload=out)
