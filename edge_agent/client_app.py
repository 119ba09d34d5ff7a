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
SecAgg+ epoch state encrypted in :class:`edge_agent.store.EdgeStore` instead.
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
from edge_agent.state_record import blob, integer, num, text
from edge_agent.store import EdgeStore
from protocols.daily import (
    REPORT_FIELDS,
    DayReply,
    DayRequest,
    EnrolReply,
    EnrolRequest,
    Keys,
    StageReply,
    StageRequest,
)
from protocols.keys import AgreementKey, IdentityKey, derive_key, ring_keystream
from protocols.neighbourhood import AgentPlan, AssistedNeighbourhoodAgent, Envelope, Keyring
from simulation.engine import agent_uniforms, step_day
from simulation.estimators import get_estimator
from simulation.models import SIR, infection_probability, infection_probability_dbeta

__all__ = ["app", "STORE_CONFIG_KEY", "USER_STATUS_KEY", "DeviceProtocolError",
           "private_uniforms"]

STORE_CONFIG_KEY = "lpm-store"  # node config: path of the device's EdgeStore
USER_STATUS_KEY = "user"  # EdgeStore status key written by `lpm edge status`
_UNIFORM_LABEL = "lpm-edge/device-uniforms/v1"
_SECRETS = ("nb_key", "identity", "u_seed")

app = ClientApp()


class DeviceProtocolError(RuntimeError):
    """A message the device cannot act on (wrong order, missing enrolment)."""


def _cfg(message: Message) -> ConfigRecord:
    return message.content.config_records[Keys.RECORD]


def _reply(message: Message, body: dict) -> Message:
    return Message(RecordDict({Keys.RECORD: ConfigRecord(body)}), reply_to=message)


def _state(context: Context) -> ConfigRecord:
    if Keys.DEVICE_STATE not in context.state.config_records:
        raise DeviceProtocolError("device not enrolled")
    return context.state.config_records[Keys.DEVICE_STATE]


def private_uniforms(seed: bytes, run_id: str, day: int, streams: int = 2) -> torch.Tensor:
    """The device's own uniforms [streams, 1] for ``day``: ChaCha20 under a key derived from
    its private seed (nobody without the seed can recompute them)."""
    key = derive_key(seed, f"{run_id}\x00{int(day)}".encode(), label=_UNIFORM_LABEL)
    raw = ring_keystream(key, streams)
    top24 = (raw >> 40) & 0xFFFFFF
    return (top24.to(torch.float32) * (1.0 / (1 << 24))).view(streams, 1)


def _secret(st: ConfigRecord, name: str) -> bytes:
    """The device's secret ``name``: from its encrypted store if it has one."""
    if "store" not in st:
        return blob(st, name)
    with EdgeStore(str(st["store"])) as store:
        return store.get_private_key(f"{text(st, 'run_id')}/{name}")


@contextmanager
def _secagg(st: ConfigRecord) -> Iterator[SecAggDevice]:
    """The device's SecAgg+ side: epoch secrets in its store if it has one (opened once)."""
    if "store" not in st:
        yield SecAggDevice(st, blob(st, "identity"))
        return
    run_id = str(st["run_id"])
    with EdgeStore(str(st["store"])) as store:
        yield SecAggDevice(st, store.get_private_key(f"{run_id}/identity"),
                           StoreVault(store, run_id))


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
        with EdgeStore(store_path) as store:
            for name, raw in secrets.items():
                store.put_private_key(f"{req.run_id}/{name}", raw)
            store.set_contacts({k: float(v) for k, v in json.loads(req.weights).items()})
    else:
        for name, raw in secrets.items():
            st[name] = raw
    st["day"] = -1
    if not req.shared_seed:  # private initial status: nobody else can recompute it
        infected = float(private_uniforms(secrets["u_seed"], req.run_id, -1)[0, 0]) \
            < req.initial_infected
        st["S"], st["I"], st["R"] = float(not infected), float(infected), 0.0
    if req.resume_day > 0:  # a resumed run: this device's own state at the end of day D − 1
        st["day"] = _restore_day(st, req.run_id, req.resume_day - 1)
    user = _user_status(st)
    if user is not None:
        st["S"], st["I"], st["R"] = (float(user == c) for c in ("S", "I", "R"))
    context.state.config_records[Keys.DEVICE_STATE] = st
    nb = AgreementKey.from_private_bytes(secrets["nb_key"]).public_bytes()
    ident = IdentityKey.from_private_bytes(secrets["identity"]).public_bytes()
    return _reply(message, EnrolReply(nb_pub=nb, identity=ident).to_dict())


def _day_key(run_id: str, day: int) -> str:
    return f"day/{run_id}/{int(day)}"


def _restore_day(st: ConfigRecord, run_id: str, day: int) -> int:
    """Load S, I, R at the end of ``day`` from the device's store; returns ``day``."""
    if "store" not in st:
        raise DeviceProtocolError(f"cannot resume run {run_id}: this device keeps no store")
    with EdgeStore(str(st["store"])) as store:
        rec = store.status(_day_key(run_id, day))
    if rec is None:
        raise DeviceProtocolError(f"cannot resume run {run_id}: no saved state for day {day}")
    for c in ("S", "I", "R"):
        st[c] = float(rec[c])
    return day


def _agent(st: ConfigRecord) -> AssistedNeighbourhoodAgent:
    keyring = Keyring(str(st["agent_id"]), str(st["run_id"]),
                      AgreementKey.from_private_bytes(_secret(st, "nb_key")))
    return AssistedNeighbourhoodAgent(str(st["agent_id"]), str(st["run_id"]), keyring=keyring)


def _start(agent: AssistedNeighbourhoodAgent, st: ConfigRecord, plan: AgentPlan,
           keys: dict[str, bytes], value: float, *, send: bool = True) -> list[Envelope]:
    agent.keyring.add_peers(keys)
    weights = {k: float(v) for k, v in json.loads(str(st["weights"])).items()}
    if not send:  # re-arm only: yesterday's contributions were sent yesterday
        agent.resume(plan, value, weights=weights, weight_sum=num(st, "weight_sum"))
        return []
    return agent.start(plan, value, weights=weights, weight_sum=num(st, "weight_sum"))


def _user_status(st: ConfigRecord) -> str | None:
    """The status the device's user set (``lpm edge status``), if any."""
    if "store" not in st:
        return None
    with EdgeStore(str(st["store"])) as store:
        rec = store.status(USER_STATUS_KEY)
    return None if rec is None else str(rec["state"])


def _uniforms(st: ConfigRecord, day: int) -> torch.Tensor:
    if bool(st["shared_seed"]):  # explicit equivalence-test mode: the public stream
        n, i = integer(st, "n"), integer(st, "index")
        return agent_uniforms(integer(st, "uniform_seed"), day, torch.tensor([i]), n)
    return private_uniforms(_secret(st, "u_seed"), str(st["run_id"]), day)


def _finish_day(st: ConfigRecord, req: DayRequest) -> list[float]:
    """Learn yesterday's neighbour sum, update the status, return the (clear) report."""
    day = integer(st, "day")
    agent = _agent(st)
    prev_keys = {k: bytes.fromhex(v) for k, v in json.loads(str(st["keys"])).items()}
    _start(agent, st, AgentPlan.from_dict(json.loads(str(st["plan"]))), prev_keys,
           num(st, "value"), send=False)  # re-arm the state machine with yesterday's inputs
    envelopes = [Envelope.from_bytes(b) for b in req.delivery]
    res = agent.on_masked(envelopes, Envelope.from_bytes(req.mask_sum) if req.mask_sum else None)
    total = 0.0 if res is None else float(res.value)
    state = {c: torch.tensor([num(st, c)]) for c in ("S", "I", "R")}
    state["new_infections"] = torch.zeros(1)
    degree = torch.tensor([num(st, "degree")])
    sums = torch.tensor([total], dtype=torch.float32)
    theta = torch.tensor(req.theta_beta)
    p = float(infection_probability(sums, state["S"], degree, theta)[0])
    dp = float(infection_probability_dbeta(sums, state["S"], degree, theta)[0])
    user = _user_status(st)
    if user is not None:  # the person's own status: nothing simulated
        new_inf = 1.0 if num(st, "S") > 0.5 and user == "I" else 0.0
        st["S"], st["I"], st["R"] = (float(user == c) for c in ("S", "I", "R"))
    else:
        model = SIR(beta=num(st, "beta"), gamma=num(st, "gamma"))
        with torch.no_grad():
            new = step_day(model, state, day, _uniforms(st, day),
                           neighbour_sum=lambda x: sums, degree=degree,
                           attributes={"age_band": torch.zeros(1, dtype=torch.int8)},
                           estimator=get_estimator("straight_through"))
        for c in ("S", "I", "R"):
            st[c] = float(new[c][0])
        new_inf = float(new["new_infections"][0])
    if "store" in st:
        rec = {"run_id": str(st["run_id"]), "day": day, "S": st["S"], "I": st["I"],
               "R": st["R"], "risk": p}
        with EdgeStore(str(st["store"])) as store:
            store.set_status("run", rec)
            store.set_status(_day_key(str(st["run_id"]), day), rec)  # for a resumed run
    values = [num(st, "S"), num(st, "I"), num(st, "R"), new_inf, p, dp, 1.0]
    if len(values) != len(REPORT_FIELDS) or not all(math.isfinite(v) for v in values):
        raise DeviceProtocolError("non-finite report")
    return values


@app.query("day")
def day(message: Message, context: Context) -> Message:
    """Finish the previous day (if delivered) and start the next one (if planned)."""
    req = DayRequest.from_dict(_cfg(message))
    st = _state(context)
    out = DayReply()
    if integer(st, "day") >= req.day:
        raise DeviceProtocolError(f"day {req.day} again: device is at day {integer(st, 'day')}")
    if req.has_delivery and integer(st, "day") == req.day - 1:
        report = _finish_day(st, req)
        if req.secagg_epoch >= 0:  # a report round today (never a sum of fewer than 3)
            with _secagg(st) as sec:
                if req.secagg_config:  # the first day of a key epoch
                    out.advertise = sec.advertise(
                        req.secagg_config, req.registry, str(st["agent_id"]),
                        run_id=str(st["run_id"]), day=req.day - 1, report=report,
                        registry_index=req.registry_index)
                else:
                    out.masked = sec.masked_input(req.day - 1, report,
                                                  run_id=str(st["run_id"]),
                                                  epoch=req.secagg_epoch)
            out.report_day = req.day - 1
    elif integer(st, "day") >= 0:  # missed deliveries (offline): status kept, rejoin today
        out.caught_up = req.day - 1 - integer(st, "day")
    if req.has_plan:
        plan = AgentPlan.from_dict(json.loads(req.plan))
        if plan.round != req.day:
            raise DeviceProtocolError(f"plan for round {plan.round} in the day {req.day} message")
        keys = {k: bytes.fromhex(v) for k, v in json.loads(req.keys).items()}
        value = num(st, "I")
        envs = _start(_agent(st), st, plan, keys, value)
        out.envelopes = [e.to_bytes() for e in envs]
        st["plan"], st["keys"], st["value"] = req.plan, req.keys, value
    st["day"] = req.day
    return _reply(message, out.to_dict())


@app.query("stage")
def stage(message: Message, context: Context) -> Message:
    """One later SecAgg+ stage of the day's report (masked_input, consistency, unmask)."""
    req = StageRequest.from_dict(_cfg(message))
    st = _state(context)
    with _secagg(st) as sec:
        payload = sec.stage(req.stage, req.day, req.payload)
    return _reply(message, StageReply(payload=payload).to_dict())
