"""Flower ClientApp of an edge agent (Message API); the wire format is :mod:`protocols.daily`.

- ``query.enrol``: the device learns its run, its pseudonymous contact weights and its
  initial status; it makes an X25519 key for the neighbourhood protocol, an Ed25519 identity
  for SecAgg+ and a private 256-bit seed for its own events (CSPRNG; never sent). Replies
  with the two public keys.
- ``query.day``: yesterday's delivery (masked contributions + mask sum) gives the device its
  neighbour sum Σ_j w_ij I_j; it computes its risk p_i and ∂p_i/∂β at the model's θ (public,
  in the message), updates its own status — from its user (``lpm edge status``) if set, else
  simulated with its private uniforms — and answers with its report masked by multi-round
  SecAgg+ (:mod:`edge_agent.secagg_flower`): on the first day of a key epoch the answer is
  its key advertisement (the report is masked once the roster comes), on later days the
  masked report itself; it also uploads its masked contributions for today's plan.
- ``query.stage``: the later SecAgg+ stages of the day (``masked_input`` on an epoch's first
  day, ``consistency``, ``unmask``). The report (:data:`protocols.daily.REPORT_FIELDS`) is
  only ever sent masked.

A device that missed days (offline) catches up on its next message: it skips the deliveries
it missed, its status stays as it was while it was away (its user can set it), and it joins
today's plan. State lives in the node's ``context.state``; a real device
(``lpm edge run --store PATH``, node config ``lpm-store``) keeps its private keys, seed and
SecAgg+ epoch state encrypted in :class:`edge_agent.store.EdgeStore` instead, opens it once
per message (:class:`_Device`) and exports its state record there after every message, so a
SuperNode restarted without its node state picks up where it was.

With ``tangents`` (run config) the device also carries dS, dI, dR w.r.t. β: its tangent dI
goes through a second neighbourhood round (``tangent_round(day)``) beside its value, its own
step is differentiated in forward mode with the neighbours' tangent sum, and its report
carries ∂new_i/∂β (``d_new_dbeta``): the exact decentralised gradient.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from edge_agent.secagg_flower import SecAggDevice, StoreVault
from edge_agent.state_record import blob, export_record, integer, num, restore_record, text
from edge_agent.store import EdgeStore
from protocols.daily import (
    REPORT_FIELDS,
    TANGENT_BOUND,
    DayReply,
    DayRequest,
    EnrolReply,
    EnrolRequest,
    Keys,
    StageReply,
    StageRequest,
    tangent_round,
    value_round,
)
from protocols.keys import AgreementKey, IdentityKey, derive_key, ring_keystream
from protocols.neighbourhood import AgentPlan, AssistedNeighbourhoodAgent, Envelope, Keyring
from protocols.ring import FixedPointRing
from simulation.engine import agent_uniforms, step_day
from simulation.estimators import get_estimator
from simulation.models import SIR, infection_probability, infection_probability_dbeta

__all__ = ["app", "STORE_CONFIG_KEY", "USER_STATUS_KEY", "DeviceProtocolError",
           "private_uniforms"]

STORE_CONFIG_KEY = "lpm-store"  # node config: path of the device's EdgeStore
USER_STATUS_KEY = "user"  # EdgeStore status key written by `lpm edge status`
RECORD_STATUS_KEY = "device-record"  # EdgeStore status key: the exported state record
_UNIFORM_LABEL = "lpm-edge/device-uniforms/v1"
_COMPARTMENTS = ("S", "I", "R")

app = ClientApp()


class DeviceProtocolError(RuntimeError):
    """A message the device cannot act on (wrong order, missing enrolment)."""


def _cfg(message: Message) -> ConfigRecord:
    return message.content.config_records[Keys.RECORD]


def _reply(message: Message, body: dict) -> Message:
    return Message(RecordDict({Keys.RECORD: ConfigRecord(body)}), reply_to=message)


def private_uniforms(seed: bytes, run_id: str, day: int, streams: int = 2) -> torch.Tensor:
    """The device's own uniforms [streams, 1] for ``day``: ChaCha20 under a key derived from
    its private seed (nobody without the seed can recompute them)."""
    key = derive_key(seed, f"{run_id}\x00{int(day)}".encode(), label=_UNIFORM_LABEL)
    raw = ring_keystream(key, streams)
    top24 = (raw >> 40) & 0xFFFFFF
    return (top24.to(torch.float32) * (1.0 / (1 << 24))).view(streams, 1)


class _Device:
    """One message's view of the device: its state record and its store, opened at most
    once per message (the store's scrypt key is cached per process)."""

    def __init__(self, st: ConfigRecord) -> None:
        self.st = st
        self._store: EdgeStore | None = None
        self._nb_key: AgreementKey | None = None  # read once per message
        self._agreed: dict[str, tuple[bytes, bytes]] = {}
        self._agreed_at_load = 0

    @property
    def store(self) -> EdgeStore | None:
        if "store" not in self.st:
            return None
        if self._store is None:
            self._store = EdgeStore(str(self.st["store"]))
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def secret(self, name: str) -> bytes:
        """The device's secret ``name``: from its encrypted store if it has one."""
        store = self.store
        if store is None:
            return blob(self.st, name)
        return store.get_private_key(f"{text(self.st, 'run_id')}/{name}")

    def _optional_secret(self, name: str) -> bytes | None:
        store = self.store
        if store is None:
            return blob(self.st, name) if name in self.st else None
        try:
            return store.get_private_key(f"{text(self.st, 'run_id')}/{name}")
        except KeyError:
            return None

    def keyring(self) -> Keyring:
        """A keyring for one neighbourhood agent (its own replay memory) over the X25519
        secrets this device already agreed in the run (kept like its other secrets), so a
        day costs no agreement with a known contact and a contact's key cannot change
        between messages unnoticed."""
        if self._nb_key is None:
            self._nb_key = AgreementKey.from_private_bytes(self.secret("nb_key"))
            self._agreed = _load_agreed(self._optional_secret(_AGREED),
                                        self._nb_key.public_bytes())
            self._agreed_at_load = len(self._agreed)
        return Keyring(text(self.st, "agent_id"), text(self.st, "run_id"), self._nb_key,
                       agreed=self._agreed)

    def keep_agreed(self) -> None:
        """Save the run's agreed secrets if this message added any."""
        if self._nb_key is None or len(self._agreed) == self._agreed_at_load:
            return
        raw = _dump_agreed(self._agreed, self._nb_key.public_bytes())
        store = self.store
        if store is None:
            self.st[_AGREED] = raw
        else:
            store.put_private_key(f"{text(self.st, 'run_id')}/{_AGREED}", raw)
        self._agreed_at_load = len(self._agreed)

    def user_status(self) -> str | None:
        """The status the device's user set (``lpm edge status``), if any."""
        store = self.store
        rec = None if store is None else store.status(USER_STATUS_KEY)
        return None if rec is None else str(rec["state"])

    def secagg(self) -> SecAggDevice:
        """The device's SecAgg+ side: epoch secrets in its store if it has one."""
        store = self.store
        if store is None:
            return SecAggDevice(self.st, blob(self.st, "identity"))
        run_id = text(self.st, "run_id")
        return SecAggDevice(self.st, store.get_private_key(f"{run_id}/identity"),
                            StoreVault(store, run_id))


_AGREED = "nb_agreed"  # the run's X25519 secrets with contacts, bound to the device's key


def _dump_agreed(agreed: dict[str, tuple[bytes, bytes]], own_public: bytes) -> bytes:
    return json.dumps({"pk": own_public.hex(),
                       "peers": {p: pub.hex() + sec.hex() for p, (pub, sec) in agreed.items()}}
                      ).encode()


def _load_agreed(raw: bytes | None, own_public: bytes) -> dict[str, tuple[bytes, bytes]]:
    """The saved agreements, or none when they belong to another key (a new enrolment)."""
    if raw is None:
        return {}
    try:
        d = json.loads(raw.decode())
        if d["pk"] != own_public.hex():
            return {}
        out = {str(p): (bytes.fromhex(v[:64]), bytes.fromhex(v[64:]))
               for p, v in d["peers"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DeviceProtocolError(f"the device's saved key agreements are damaged: {exc}"
                                  ) from exc
    if any(len(pub) != 32 or len(sec) != 32 for pub, sec in out.values()):
        raise DeviceProtocolError("the device's saved key agreements are damaged")
    return out


@contextmanager
def _device(st: ConfigRecord) -> Iterator[_Device]:
    dev = _Device(st)
    try:
        yield dev
    finally:
        dev.close()


@contextmanager
def _session(context: Context) -> Iterator[_Device]:
    """The device of one message, its store opened at most once. A device with a store
    exports its whole state record there after every message it answers, so a SuperNode
    restarted without its node state (a new process, a rebooted phone) restores it — the
    neighbourhood agents' re-arm inputs (plan, keys, value; ``resume``), its SecAgg+
    epoch state and its status — instead of dropping out of the run."""
    records = context.state.config_records
    if Keys.DEVICE_STATE in records:
        dev = _Device(records[Keys.DEVICE_STATE])
    else:
        path = str(context.node_config.get(STORE_CONFIG_KEY, ""))
        if not path:
            raise DeviceProtocolError("device not enrolled")
        dev = _Device(ConfigRecord({"store": path}))
    try:
        if Keys.DEVICE_STATE not in records:
            saved = None if dev.store is None else dev.store.status(RECORD_STATUS_KEY)
            if saved is None:
                raise DeviceProtocolError("device not enrolled")
            dev.st = restore_record(saved)
            records[Keys.DEVICE_STATE] = dev.st
        yield dev
        dev.keep_agreed()
        if dev.store is not None:
            dev.store.set_status(RECORD_STATUS_KEY, export_record(dev.st))
    finally:
        dev.close()


@app.query("enrol")
def enrol(message: Message, context: Context) -> Message:
    """Store the device's run settings, create its keys and seed, answer with public keys."""
    req = EnrolRequest.from_dict(_cfg(message))
    secrets = {"nb_key": AgreementKey.generate().private_bytes(),
               "identity": IdentityKey.generate().private_bytes(),
               "u_seed": os.urandom(32)}
    st = ConfigRecord({k: v for k, v in req.to_dict().items()})
    store_path = str(context.node_config.get(STORE_CONFIG_KEY, ""))
    if store_path:  # a real device: secrets encrypted at rest, never in the node's state
        st["store"] = store_path
    else:
        for name, raw in secrets.items():
            st[name] = raw
    st["day"] = -1
    for c in _COMPARTMENTS:  # ∂state/∂β (run config ``tangents``)
        st[f"d{c}"] = 0.0
    with _device(st) as dev:
        kept = _enrolment(dev, req.run_id) if req.resume_day > 0 else None
        if kept is not None:  # a resumed run: the same identity and private seed as before
            secrets.update(kept)
        if dev.store is not None:
            for name, raw in secrets.items():
                dev.store.put_private_key(f"{req.run_id}/{name}", raw)
            dev.store.set_contacts({k: float(v) for k, v in json.loads(req.weights).items()})
        if not req.shared_seed:  # private initial status: nobody else can recompute it
            infected = float(private_uniforms(secrets["u_seed"], req.run_id, -1)[0, 0]) \
                < req.initial_infected
            st["S"], st["I"], st["R"] = float(not infected), float(infected), 0.0
        if req.resume_day > 0:  # a resumed run: this device's own state at the end of D − 1
            st["day"] = _restore_day(dev, req.run_id, req.resume_day - 1)
        user = dev.user_status()
        if user is not None:
            st["S"], st["I"], st["R"] = (float(user == c) for c in _COMPARTMENTS)
        if dev.store is not None:
            dev.store.set_status(RECORD_STATUS_KEY, export_record(st))
    context.state.config_records[Keys.DEVICE_STATE] = st
    nb = AgreementKey.from_private_bytes(secrets["nb_key"]).public_bytes()
    ident = IdentityKey.from_private_bytes(secrets["identity"]).public_bytes()
    return _reply(message, EnrolReply(nb_pub=nb, identity=ident).to_dict())


def _enrolment(dev: _Device, run_id: str) -> dict[str, bytes] | None:
    """This device's identity key and private seed of ``run_id`` from its store (the
    enrolment a resumed run reuses: its private seed keeps drawing the same events, its
    identity stays the one the coordinator registered), or ``None`` without a store or an
    earlier enrolment. The neighbourhood key is drawn afresh: the restarted coordinator's
    relay and proxies have new keys, and agreements bound to the old one are dropped."""
    if dev.store is None:
        return None
    out = {}
    for name in ("identity", "u_seed"):
        try:
            out[name] = dev.store.get_private_key(f"{run_id}/{name}")
        except KeyError:
            return None
    return out


def _day_key(run_id: str, day: int) -> str:
    return f"day/{run_id}/{int(day)}"


def _restore_day(dev: _Device, run_id: str, day: int) -> int:
    """Load S, I, R (and their tangents) at the end of ``day`` from the device's store."""
    if dev.store is None:
        raise DeviceProtocolError(f"cannot resume run {run_id}: this device keeps no store")
    rec = dev.store.status(_day_key(run_id, day))
    if rec is None:
        raise DeviceProtocolError(f"cannot resume run {run_id}: no saved state for day {day}")
    for c in _COMPARTMENTS:
        dev.st[c] = float(rec[c])
        dev.st[f"d{c}"] = float(rec.get(f"d{c}", 0.0))
    return day


def _agent(dev: _Device, tangent: bool = False) -> AssistedNeighbourhoodAgent:
    st = dev.st
    return AssistedNeighbourhoodAgent(str(st["agent_id"]), str(st["run_id"]),
                                      keyring=dev.keyring(),
                                      ring=FixedPointRing(integer(st, "frac_bits")),
                                      value_bound=TANGENT_BOUND if tangent else None)


def _start(agent: AssistedNeighbourhoodAgent, st: ConfigRecord, plan: AgentPlan,
           keys: dict[str, bytes], value: float, *, send: bool = True) -> list[Envelope]:
    agent.keyring.add_peers(keys)
    weights = {k: float(v) for k, v in json.loads(str(st["weights"])).items()}
    if not send:  # re-arm only: yesterday's contributions were sent yesterday
        agent.resume(plan, value, weights=weights, weight_sum=num(st, "weight_sum"))
        return []
    return agent.start(plan, value, weights=weights, weight_sum=num(st, "weight_sum"))


def _uniforms(dev: _Device, day: int) -> torch.Tensor:
    st = dev.st
    if bool(st["shared_seed"]):  # explicit equivalence-test mode: the public stream
        n, i = integer(st, "n"), integer(st, "index")
        return agent_uniforms(integer(st, "uniform_seed"), day, torch.tensor([i]), n)
    return private_uniforms(dev.secret("u_seed"), str(st["run_id"]), day)


def _received(dev: _Device, plan_key: str, keys_key: str, value_key: str,
              delivery: list[bytes], mask_sum: bytes) -> float:
    """Yesterday's neighbour sum of one round: re-arm the state machine with yesterday's
    inputs (:meth:`AssistedNeighbourhoodAgent.resume`), then unmask the delivery."""
    st = dev.st
    agent = _agent(dev, tangent=plan_key == "tplan")
    prev_keys = {k: bytes.fromhex(v) for k, v in json.loads(str(st[keys_key])).items()}
    _start(agent, st, AgentPlan.from_dict(json.loads(str(st[plan_key]))), prev_keys,
           num(st, value_key), send=False)
    envelopes = [Envelope.from_bytes(b) for b in delivery]
    res = agent.on_masked(envelopes, Envelope.from_bytes(mask_sum) if mask_sum else None)
    return 0.0 if res is None else float(res.value)


def _finish_day(dev: _Device, req: DayRequest) -> list[float]:
    """Learn yesterday's neighbour sum, update the status, return the (clear) report."""
    st = dev.st
    day = integer(st, "day")
    tangents = bool(st.get("tangents", False))
    total = _received(dev, "plan", "keys", "value", req.delivery, req.mask_sum)
    dtotal = _received(dev, "tplan", "tkeys", "tvalue", req.tdelivery, req.tmask_sum) \
        if tangents and "tplan" in st else 0.0
    state = {c: torch.tensor([num(st, c)]) for c in _COMPARTMENTS}
    state["new_infections"] = torch.zeros(1)
    degree = torch.tensor([num(st, "degree")])
    sums = torch.tensor([total], dtype=torch.float32)
    theta = torch.tensor(req.theta_beta)
    p = float(infection_probability(sums, state["S"], degree, theta)[0])
    dp = float(infection_probability_dbeta(sums, state["S"], degree, theta)[0])
    user = dev.user_status()
    d_new = 0.0
    if user is not None:  # the person's own status: nothing simulated (its tangent is 0)
        new_inf = 1.0 if num(st, "S") > 0.5 and user == "I" else 0.0
        st["S"], st["I"], st["R"] = (float(user == c) for c in _COMPARTMENTS)
        for c in _COMPARTMENTS:
            st[f"d{c}"] = 0.0
    else:
        new, tan = _step_own(dev, state, day, sums, torch.tensor([dtotal]), degree)
        for c in _COMPARTMENTS:
            st[c] = float(new[c][0])
            st[f"d{c}"] = float(tan[c][0])
        new_inf = float(new["new_infections"][0])
        d_new = float(tan["new_infections"][0])
    if dev.store is not None:
        rec = {"run_id": str(st["run_id"]), "day": day, "S": st["S"], "I": st["I"],
               "R": st["R"], "risk": p, **{f"d{c}": st[f"d{c}"] for c in _COMPARTMENTS}}
        dev.store.set_status("run", rec)
        dev.store.set_status(_day_key(str(st["run_id"]), day), rec)  # for a resumed run
    values = [num(st, "S"), num(st, "I"), num(st, "R"), new_inf, p, dp, d_new, 1.0]
    if len(values) != len(REPORT_FIELDS) or not all(math.isfinite(v) for v in values):
        raise DeviceProtocolError("non-finite report")
    return values


def _step_own(dev: _Device, state: dict[str, torch.Tensor], day: int, sums: torch.Tensor,
              dsums: torch.Tensor, degree: torch.Tensor
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The device's own day (its private uniforms); with ``tangents`` differentiated in
    forward mode w.r.t. β (neighbours' tangents ``dsums``), as ``HybridSimulation`` does for
    the synthetic agents. Returns the new state and its tangents (zeros without)."""
    import torch.autograd.forward_ad as fwad

    st = dev.st
    model = SIR(beta=num(st, "beta"), gamma=num(st, "gamma"))
    estimator = get_estimator(str(st.get("estimator", "straight_through")))
    attrs = {"age_band": torch.zeros(1, dtype=torch.int8)}
    uniforms = _uniforms(dev, day)
    if not bool(st.get("tangents", False)):
        with torch.no_grad():
            new = step_day(model, state, day, uniforms, neighbour_sum=lambda x: sums,
                           degree=degree, attributes=attrs, estimator=estimator)
        return new, {k: torch.zeros_like(v) for k, v in new.items()}
    beta = num(st, "beta")
    with torch.no_grad(), fwad.dual_level():
        beta_t = fwad.make_dual(torch.full((day + 1,), beta), torch.ones(day + 1))
        dual = {k: fwad.make_dual(v, torch.tensor([num(st, f"d{k}")]) if k in _COMPARTMENTS
                                  else torch.zeros_like(v)) for k, v in state.items()}
        out = step_day(model, dual, day, uniforms,
                       neighbour_sum=lambda x: fwad.make_dual(sums, dsums.to(sums.dtype)),
                       degree=degree, attributes=attrs, estimator=estimator,
                       extras={"beta_t": beta_t})
        unpacked = {k: fwad.unpack_dual(v) for k, v in out.items()}
    new = {k: u.primal.clone() for k, u in unpacked.items()}
    tan = {k: torch.zeros_like(u.primal) if u.tangent is None else u.tangent.clone()
           for k, u in unpacked.items()}
    return new, tan


@app.query("day")
def day(message: Message, context: Context) -> Message:
    """Finish the previous day (if delivered) and start the next one (if planned)."""
    req = DayRequest.from_dict(_cfg(message))
    with _session(context) as dev:
        out = _day(dev, req)
    return _reply(message, out.to_dict())


def _day(dev: _Device, req: DayRequest) -> DayReply:
    st = dev.st
    out = DayReply()
    tangents = bool(st.get("tangents", False))
    if integer(st, "day") >= req.day:
        raise DeviceProtocolError(f"day {req.day} again: device is at day {integer(st, 'day')}")
    if req.has_delivery and integer(st, "day") == req.day - 1:
        report = _finish_day(dev, req)
        if req.secagg_epoch >= 0:  # a report round today (never a sum of fewer than 3)
            sec = dev.secagg()
            if req.secagg_config:  # the first day of a key epoch
                out.advertise = sec.advertise(
                    req.secagg_config, req.registry, str(st["agent_id"]),
                    run_id=str(st["run_id"]), day=req.day - 1, report=report,
                    registry_index=req.registry_index)
            else:
                out.masked = sec.masked_input(req.day - 1, report, run_id=str(st["run_id"]),
                                              epoch=req.secagg_epoch)
            out.report_day = req.day - 1
    elif integer(st, "day") >= 0:  # missed deliveries (offline): status kept, rejoin today
        out.caught_up = req.day - 1 - integer(st, "day")
    if req.has_plan:
        plan = AgentPlan.from_dict(json.loads(req.plan))
        if plan.round != value_round(req.day, tangents):
            raise DeviceProtocolError(f"plan for round {plan.round} in the day {req.day} message")
        keys = {k: bytes.fromhex(v) for k, v in json.loads(req.keys).items()}
        value = num(st, "I")
        out.envelopes = [e.to_bytes() for e in _start(_agent(dev), st, plan, keys, value)]
        st["plan"], st["keys"], st["value"] = req.plan, req.keys, value
        if tangents:
            tplan = AgentPlan.from_dict(json.loads(req.tplan))
            if tplan.round != tangent_round(req.day):
                raise DeviceProtocolError(f"tangent plan for round {tplan.round} in the day "
                                          f"{req.day} message")
            tkeys = {k: bytes.fromhex(v) for k, v in json.loads(req.tkeys).items()}
            tvalue = num(st, "dI")
            if not abs(tvalue) <= TANGENT_BOUND:
                raise DeviceProtocolError(f"tangent {tvalue} exceeds the public bound "
                                          f"{TANGENT_BOUND}")
            out.tenvelopes = [e.to_bytes() for e in _start(_agent(dev, tangent=True), st,
                                                           tplan, tkeys, tvalue)]
            st["tplan"], st["tkeys"], st["tvalue"] = req.tplan, req.tkeys, tvalue
    st["day"] = req.day
    return out


@app.query("stage")
def stage(message: Message, context: Context) -> Message:
    """One later SecAgg+ stage of the day's report (masked_input, consistency, unmask)."""
    req = StageRequest.from_dict(_cfg(message))
    with _session(context) as dev:
        payload = dev.secagg().stage(req.stage, req.day, req.payload)
    return _reply(message, StageReply(payload=payload).to_dict())
