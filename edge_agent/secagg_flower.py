"""The device side of SecAgg+ (protocols.secagg) over Flower's Message API.

:class:`SecAggDevice` keeps one round's client state (private keys included) in the
device's own node state and advances it one stage per message; the daily ClientApp
(:mod:`edge_agent.client_app`) uses it to send its report masked. The input is always the
device's own vector, given by the app: the coordinator never names code for the device to
run. Every round is bound to its run and day (the round config's context) and the device
refuses a config for another run or day.

``app`` is a stand-alone SecAgg+ ClientApp (tests, benchmarks): one message type
``query.secagg`` with ``{"stage", "payload", ...}``; its input is :func:`demo_input` of the
node's ``partition-id``.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from protocols.keys import IdentityKey
from protocols.secagg import RoundConfig
from protocols.secagg.client import SecAggClient

__all__ = ["app", "demo_input", "SecAggDevice", "SecAggDeviceError"]

app = ClientApp()
_STATE = "secagg"


class SecAggDeviceError(RuntimeError):
    """The device got a SecAgg message it cannot act on (not enrolled, unknown stage,
    a round bound to another run or day)."""


def demo_input(partition_id: int, length: int) -> torch.Tensor:
    """A deterministic integer vector per device (tests and demos)."""
    return (torch.arange(length, dtype=torch.int64) - length // 2) * (partition_id + 1)


class SecAggDevice:
    """One device's SecAgg+ client state, persisted in ``st`` (a node-state record)."""

    def __init__(self, st: ConfigRecord, identity_private: bytes) -> None:
        self.st = st
        self.identity = IdentityKey.from_private_bytes(identity_private)

    def advertise(self, config: bytes, registry: list[bytes], client_id: str, *, run_id: str,
                  day: int, report: list[float] | torch.Tensor,
                  registry_index: list[int] | None = None) -> bytes:
        """Start the round for ``day``'s report (stage 0): returns the key advertisement.
        ``registry`` is the roster's identity keys, or — with ``registry_index`` — only those
        of the listed roster indices (itself and its neighbours: all a client verifies)."""
        cfg = RoundConfig.from_bytes(bytes(config))
        if registry_index is not None:
            registry = _full_registry(cfg.n, registry_index, registry)
        if cfg.run_id != run_id or cfg.round != day:
            raise SecAggDeviceError(f"round bound to {cfg.run_id!r} day {cfg.round}, expected "
                                    f"{run_id!r} day {day}")
        if client_id not in cfg.client_ids:
            raise SecAggDeviceError(f"{client_id} is not in the round's roster")
        index = cfg.client_ids.index(client_id)
        client = SecAggClient(cfg, index, self.identity, [bytes(b) for b in registry])
        out = client.advertise_keys()
        known = [j for j, b in enumerate(registry) if b != _UNKNOWN]
        self.st["sa_config"] = bytes(config)
        self.st["sa_reg_index"], self.st["sa_registry"] = known, [bytes(registry[j]) for j in known]
        self.st["sa_index"], self.st["sa_input"] = index, [float(v) for v in report]
        self.st["sa_state"] = client.export_state()
        return out

    def stage(self, name: str, day: int, payload: bytes) -> bytes:
        """Advance the round by one stage (share_keys, masked_input, unmask)."""
        if "sa_state" not in self.st:
            raise SecAggDeviceError("no SecAgg round in progress on this device")
        cfg = RoundConfig.from_bytes(bytes(self.st["sa_config"]))
        if cfg.round != day:
            raise SecAggDeviceError(f"stage {name} for day {day}, round is day {cfg.round}")
        registry = _full_registry(cfg.n, [int(j) for j in self.st["sa_reg_index"]],
                                  [bytes(b) for b in self.st["sa_registry"]])
        client = SecAggClient.restore(cfg, int(self.st["sa_index"]), self.identity, registry,
                                      bytes(self.st["sa_state"]))
        payload = bytes(payload)
        if name == "share_keys":
            out = client.share_keys(payload)
        elif name == "masked_input":
            x = torch.tensor(list(self.st["sa_input"]), dtype=torch.float64)
            if cfg.spec.kind == "int":
                x = x.round().to(torch.int64)
            out = client.masked_input(payload, x)
        elif name == "unmask":
            out = client.unmask(payload)
        else:
            raise SecAggDeviceError(f"unknown SecAgg stage {name!r}")
        self.st["sa_state"] = client.export_state()
        return out


_UNKNOWN = b"\x00" * 32  # placeholder for a roster member this client never verifies


def _full_registry(n: int, index: list[int], keys: list[bytes]) -> list[bytes]:
    if len(index) != len(keys) or any(not 0 <= int(j) < n for j in index):
        raise SecAggDeviceError("malformed registry")
    full = [_UNKNOWN] * n
    for j, k in zip(index, keys, strict=True):
        full[int(j)] = bytes(k)
    return full


def _st(context: Context) -> ConfigRecord:
    if _STATE not in context.state.config_records:
        context.state.config_records[_STATE] = ConfigRecord(
            {"identity": IdentityKey.generate().private_bytes()})
    return context.state.config_records[_STATE]


def _reply(message: Message, **values: object) -> Message:
    return Message(RecordDict({"cfg": ConfigRecord(values)}), reply_to=message)  # type: ignore[arg-type]


@app.query("secagg")
def secagg(message: Message, context: Context) -> Message:
    """Advance this device's stand-alone SecAgg+ round by one stage."""
    cfg = message.content.config_records["cfg"]
    stage = str(cfg["stage"])
    st = _st(context)
    dev = SecAggDevice(st, bytes(st["identity"]))  # type: ignore[arg-type]
    pid = int(context.node_config.get("partition-id", -1))  # type: ignore[arg-type]
    if stage == "enrol":
        return _reply(message, identity=dev.identity.public_bytes(), partition_id=pid)
    if stage == "advertise":
        rc = RoundConfig.from_bytes(bytes(cfg["config"]))  # type: ignore[arg-type]
        x = demo_input(pid, rc.spec.length)
        out = dev.advertise(bytes(cfg["config"]), list(cfg["registry"]),  # type: ignore[arg-type]
                            rc.client_ids[int(cfg["index"])], run_id=rc.run_id,  # type: ignore[arg-type]
                            day=rc.round, report=x.tolist())
    else:
        rc = RoundConfig.from_bytes(bytes(st["sa_config"])) if "sa_config" in st else None
        out = dev.stage(stage, -1 if rc is None else rc.round, bytes(cfg["payload"]))  # type: ignore[arg-type]
    return _reply(message, payload=out)
