"""The device side of multi-round SecAgg+ (protocols.secagg.epoch_client) over Flower's
Message API.

:class:`SecAggDevice` keeps the device's SecAgg+ key epoch between messages: keys are agreed
once per epoch (:meth:`SecAggDevice.advertise`, then the roster in the ``masked_input``
stage), and each day's report is masked with masks derived with the day in their context
(:meth:`SecAggDevice.masked_input` on later days of the epoch), then the ``consistency``
and ``unmask`` stages finish the day. The epoch state (derived secret keys) and a report
waiting for its roster are kept in a :class:`Vault`: the node's state record by default,
the device's encrypted :class:`edge_agent.store.EdgeStore` on a real device
(:class:`StoreVault`), so a fresh ClientApp process per message works. The input is always
the device's own vector, given by the app: the coordinator never names code for the device
to run. Every epoch is bound to its run, every message to run, epoch, day and stage. A
device masks a day's report in one epoch only, again there only for a new attempt at a day
that aborted before it revealed anything (:data:`protocols.daily.SECAGG_ATTEMPTS`), and
never after it answered an unmask request for that day.

``app`` is a stand-alone SecAgg+ ClientApp (tests, benchmarks): one message type
``query.secagg`` with ``{"stage", "payload", ...}``; its input is :func:`demo_input` of the
node's ``partition-id``.
"""

from __future__ import annotations

import functools
import json
from typing import Protocol

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from edge_agent import state_record as rec
from edge_agent.store import EdgeStore
from protocols.daily import SECAGG_ATTEMPTS, secagg_day
from protocols.keys import IdentityKey
from protocols.secagg import RoundConfig
from protocols.secagg.epoch_client import EpochClient, EpochStage

__all__ = ["app", "demo_input", "NodeStateVault", "SecAggDevice", "SecAggDeviceError",
           "StoreVault", "Vault"]

app = ClientApp()
_STATE = "secagg"


class SecAggDeviceError(RuntimeError):
    """The device got a SecAgg message it cannot act on (not enrolled, unknown stage,
    an epoch bound to another run, a day it already reported)."""


class Vault(Protocol):
    """Where a device keeps its secret SecAgg+ epoch state between messages."""

    def get(self) -> bytes | None: ...

    def put(self, blob: bytes) -> None: ...


class NodeStateVault:
    """The epoch state in the node's state record (simulated devices)."""

    def __init__(self, st: ConfigRecord) -> None:
        self.st = st

    def get(self) -> bytes | None:
        return rec.blob(self.st, "sa_secret") if "sa_secret" in self.st else None

    def put(self, blob: bytes) -> None:
        self.st["sa_secret"] = blob


class StoreVault:
    """The epoch state encrypted in the device's EdgeStore (an open store)."""

    def __init__(self, store: EdgeStore, run_id: str) -> None:
        self.store, self.name = store, f"{run_id}/secagg-epoch"

    def get(self) -> bytes | None:
        try:
            return self.store.get_private_key(self.name)
        except KeyError:
            return None

    def put(self, blob: bytes) -> None:
        self.store.put_private_key(self.name, blob)


def demo_input(partition_id: int, length: int) -> torch.Tensor:
    """A deterministic integer vector per device (tests and demos)."""
    return (torch.arange(length, dtype=torch.int64) - length // 2) * (partition_id + 1)


@functools.lru_cache(maxsize=4)
def _config(blob: bytes) -> tuple[RoundConfig, dict[str, int]]:
    """The epoch's config, parsed and validated once per process, with its roster's index:
    its roster makes that O(devices), and a fleet's device host serves every device of the
    epoch (frozen, shared; keyed by the config's exact bytes)."""
    cfg = RoundConfig.from_bytes(blob)
    return cfg, {c: i for i, c in enumerate(cfg.client_ids)}


def _registry(n: int, index: list[int], keys: list[bytes]) -> dict[int, bytes]:
    """The identity keys the coordinator sent, by roster index (a client reads only its own
    and its neighbours', whichever entries are here)."""
    if len(index) != len(keys) or any(not 0 <= int(j) < n for j in index):
        raise SecAggDeviceError("malformed registry")
    return {int(j): bytes(k) for j, k in zip(index, keys, strict=True)}


class SecAggDevice:
    """One device's SecAgg+ epoch client. Public epoch data (config, the identity keys it
    verifies, its index) lives in ``st`` (a node-state record); secrets in ``vault``.

    A message after the advertisement costs O(k) on the device (k = its neighbours): the
    registry kept is its own and its neighbours' keys, its neighbours are recomputed from
    the config's graph seed (the placement cached per process), the parsed config cached
    per process, and the identity key is loaded only to sign the advertisement."""

    def __init__(self, st: ConfigRecord, identity_private: bytes,
                 vault: Vault | None = None) -> None:
        self.st = st
        self._identity_private = bytes(identity_private)
        self._identity: IdentityKey | None = None
        self.vault = vault if vault is not None else NodeStateVault(st)

    @property
    def identity(self) -> IdentityKey:
        """The device's Ed25519 identity key (loaded on first use)."""
        if self._identity is None:
            self._identity = IdentityKey.from_private_bytes(self._identity_private)
        return self._identity

    # -- persistence -------------------------------------------------------------------
    def _int(self, key: str) -> int:
        return rec.integer(self.st, key) if key in self.st else -1

    def _last_day(self) -> int:
        return self._int("sa_last_day")

    def _load(self) -> tuple[EpochClient, list[float] | None]:
        if "sa_config" not in self.st:
            raise SecAggDeviceError("no SecAgg+ epoch on this device")
        blob = self.vault.get()
        if blob is None:
            raise SecAggDeviceError("the SecAgg+ epoch state is missing")
        cfg, _ = _config(rec.blob(self.st, "sa_config"))
        registry = _registry(cfg.n, rec.integers(self.st, "sa_reg_index"),
                             rec.blobs(self.st, "sa_registry"))
        try:
            d = json.loads(blob.decode())
            client = EpochClient.restore(cfg, rec.integer(self.st, "sa_index"), None,
                                         registry, d["client"].encode())
            report = None if d["report"] is None else [float(v) for v in d["report"]]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SecAggDeviceError(f"the SecAgg+ epoch state is damaged: {exc}") from exc
        return client, report

    def _save(self, client: EpochClient, report: list[float] | None) -> None:
        self.vault.put(json.dumps({"client": client.export_state().decode(),
                                   "report": report}).encode())

    def _tensor(self, cfg: RoundConfig, report: list[float] | torch.Tensor) -> torch.Tensor:
        x = torch.tensor([float(v) for v in report], dtype=torch.float64)
        return x.round().to(torch.int64) if cfg.spec.kind == "int" else x

    def _check_new_day(self, day: int) -> None:
        if day <= self._last_day():
            raise SecAggDeviceError(f"day {day} already reported (last reported day "
                                    f"{self._last_day()}): a day is masked once per epoch "
                                    "attempt, never in another epoch")

    def _masked(self, client: EpochClient, day: int, attempt: int,
                report: list[float]) -> bytes:
        out = client.masked_input(secagg_day(day, attempt), self._tensor(client.config, report))
        self.st["sa_last_day"], self.st["sa_attempt"] = day, attempt
        return out

    # -- a new epoch -------------------------------------------------------------------
    def advertise(self, config: bytes, registry: list[bytes], client_id: str, *, run_id: str,
                  day: int, report: list[float] | torch.Tensor,
                  registry_index: list[int] | None = None) -> bytes:
        """Start a key epoch whose first report is ``day``'s: returns the signed key
        advertisement; the report waits (in the vault) for the roster. ``registry`` is the
        roster's identity keys, or — with ``registry_index`` — only those of the listed
        roster indices (itself and its neighbours: all a client verifies)."""
        config = bytes(config)
        cfg, roster = _config(config)
        if registry_index is None:
            if len(registry) != cfg.n:
                raise SecAggDeviceError("the registry must hold one key per roster device, "
                                        "or name its indices")
            registry_index = list(range(cfg.n))
        if cfg.run_id != run_id:
            raise SecAggDeviceError(f"epoch bound to run {cfg.run_id!r}, expected {run_id!r}")
        if cfg.round > day:
            raise SecAggDeviceError(f"epoch {cfg.round} starts after day {day}")
        index = roster.get(client_id)
        if index is None:
            raise SecAggDeviceError(f"{client_id} is not in the epoch's roster")
        self._check_new_day(day)
        x = self._tensor(cfg, report)
        cfg.spec.encode(x)  # refuse a report outside the spec before anything is sent
        client = EpochClient(cfg, index, self.identity,
                             _registry(cfg.n, registry_index, registry))
        out = client.advertise_keys()
        known = sorted(client.registry)  # itself and those of its neighbours it was sent
        self.st["sa_config"] = config
        self.st["sa_reg_index"] = known
        self.st["sa_registry"] = [client.registry[j] for j in known]
        self.st["sa_index"], self.st["sa_day"] = index, day
        self._save(client, [float(v) for v in x.tolist()])
        return out

    # -- a later day of the epoch ------------------------------------------------------
    def masked_input(self, day: int, report: list[float] | torch.Tensor, *, run_id: str,
                     epoch: int) -> bytes:
        """Mask ``day``'s report in the current epoch (no key agreement)."""
        client, _ = self._load()
        cfg = client.config
        if cfg.run_id != run_id or cfg.round != epoch:
            raise SecAggDeviceError(f"this device is in epoch {cfg.round} of {cfg.run_id!r}, "
                                    f"asked for epoch {epoch} of {run_id!r}")
        self._check_new_day(day)
        values = [float(v) for v in self._tensor(cfg, report).tolist()]
        out = self._masked(client, day, 0, values)
        self.st["sa_day"] = day
        self._save(client, values)  # kept for a retry of the day in this epoch
        return out

    # -- the stages after the day message ----------------------------------------------
    def stage(self, name: str, day: int, payload: bytes) -> bytes:
        """Advance the epoch by one stage of ``day``'s report: ``masked_input`` (the
        roster on an epoch's first day; or, with a one-byte payload, attempt ``payload[0]``
        of a day that aborted before anything was revealed), ``consistency`` (again when
        the coordinator re-issues the survivor set without devices that dropped after
        masking: only a subset of the set this device tagged is accepted), ``unmask``."""
        client, report = self._load()
        if rec.integer(self.st, "sa_day") != day:
            raise SecAggDeviceError(f"stage {name} for day {day}, the device is at day "
                                    f"{rec.integer(self.st, 'sa_day')}")
        payload = bytes(payload)
        if name == "masked_input":
            if report is None:
                raise SecAggDeviceError("no report waits to be masked")
            if len(payload) == 1:  # a new attempt at a day of this epoch
                attempt = payload[0]
                if self._int("sa_revealed_day") >= day:
                    raise SecAggDeviceError(f"day {day}: this device already revealed its "
                                            "part of an attempt; it masks the day no more")
                if day != self._last_day() or attempt <= self._int("sa_attempt") \
                        or attempt >= SECAGG_ATTEMPTS:
                    raise SecAggDeviceError(f"attempt {attempt} at day {day} is not the next "
                                            "attempt of the day this device masked")
                out = self._masked(client, day, attempt, report)
            else:
                self._check_new_day(day)
                client.accept_roster(payload)
                out = self._masked(client, day, 0, report)
        elif name == "consistency":  # a second one re-issues the set without late devices
            out = client.resign_survivors(payload) if client.stage is EpochStage.UNMASK \
                else client.sign_survivors(payload)
        elif name == "unmask":
            out = client.unmask(payload)
            self.st["sa_revealed_day"] = day
        else:
            raise SecAggDeviceError(f"unknown SecAgg stage {name!r}")
        self._save(client, report)  # only after success: a refused message changes nothing
        return out


def _st(context: Context) -> ConfigRecord:
    if _STATE not in context.state.config_records:
        context.state.config_records[_STATE] = ConfigRecord(
            {"identity": IdentityKey.generate().private_bytes()})
    return context.state.config_records[_STATE]


def _reply(message: Message, **values: object) -> Message:
    return Message(RecordDict({"cfg": ConfigRecord(values)}), reply_to=message)  # type: ignore[arg-type]


@app.query("secagg")
def secagg(message: Message, context: Context) -> Message:
    """Advance this device's stand-alone SecAgg+ sum (setup + one day) by one stage."""
    cfg = message.content.config_records["cfg"]
    stage = str(cfg["stage"])
    st = _st(context)
    dev = SecAggDevice(st, rec.blob(st, "identity"))
    pid = int(str(context.node_config.get("partition-id", -1)))
    if stage == "enrol":
        return _reply(message, identity=dev.identity.public_bytes(), partition_id=pid)
    if stage == "advertise":
        rc, _ = _config(rec.blob(cfg, "config"))
        x = demo_input(pid, rc.spec.length)
        out = dev.advertise(rec.blob(cfg, "config"), rec.blobs(cfg, "registry"),
                            rc.client_ids[rec.integer(cfg, "index")], run_id=rc.run_id,
                            day=rc.round, report=x.tolist())
    else:
        out = dev.stage(stage, rec.integer(cfg, "day"), rec.blob(cfg, "payload"))
    return _reply(message, payload=out)
