"""Flower ClientApp of an edge agent (Message API).

Messages (``query.<action>``, content in the ConfigRecord ``"cfg"``):

- ``enrol``: the device learns its run, its pseudonymous contact weights and its initial
  status; it generates an X25519 key for the neighbourhood protocol and one for masking its
  daily report, and answers with both public keys.
- ``day``: one batched message per simulated day. It carries (a) the relay's delivery for the
  previous day (masked contributions + mask sum), from which the device learns its neighbour
  sum Σ_j w_ij I_j, computes its risk p_i and ∂p_i/∂β and updates its own status with the
  day's common uniforms; and (b) the plan of the new day, for which it uploads its masked
  contributions (assisted variant). Its report (S, I, R, new infection, p, ∂p/∂β) is added to
  pairwise masks that cancel in the sum over all devices, so the coordinator sees only totals.

State lives in the node's ``context.state``, so any worker process can serve the next message.
A real device (``lpm edge run --store PATH``, node config ``lpm-store``) keeps its private keys
encrypted at rest in ``edge_agent.store.EdgeStore`` (passphrase from ``$LPM_EDGE_PASSPHRASE``)
instead, plus its pseudonymous contact weights and its status; simulated devices keep the keys
in ``context.state``.
"""

from __future__ import annotations

import json
import math

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from edge_agent.store import EdgeStore
from protocols.keys import AgreementKey, derive_key, ring_keystream
from protocols.neighbourhood import AgentPlan, AssistedNeighbourhoodAgent, Envelope, Keyring
from protocols.ring import FixedPointRing
from simulation.engine import step_uniforms
from simulation.estimators import get_estimator
from simulation.models import SIR, infection_probability, infection_probability_dbeta
from simulation.substeps import StepContext

__all__ = ["app", "REPORT_FIELDS", "STORE_CONFIG_KEY", "DeviceProtocolError"]

REPORT_FIELDS = ("S", "I", "R", "new_infections", "p", "dp_dbeta")
_STATE = "device"
STORE_CONFIG_KEY = "lpm-store"  # node config: path of the device's EdgeStore
_MASK_LABEL = "lpm-edge/report-mask/v1"

app = ClientApp()


class DeviceProtocolError(RuntimeError):
    """A message the device cannot act on (wrong order, missing enrolment)."""


def _cfg(message: Message) -> ConfigRecord:
    return message.content.config_records["cfg"]


def _state(context: Context) -> ConfigRecord:
    if _STATE not in context.state.config_records:
        raise DeviceProtocolError("device not enrolled")
    return context.state.config_records[_STATE]


@app.query("enrol")
def enrol(message: Message, context: Context) -> Message:
    """Store the device's run settings, create its keys, answer with the public keys."""
    cfg = _cfg(message)
    nb_key, agg_key = AgreementKey.generate(), AgreementKey.generate()
    st = ConfigRecord({k: cfg[k] for k in ("agent_id", "run_id", "seed", "n", "index", "degree",
                                           "beta", "gamma", "S", "I", "R", "weights",
                                           "weight_sum", "frac_bits")})
    store_path = str(context.node_config.get(STORE_CONFIG_KEY, ""))
    if store_path:  # a real device: keys encrypted at rest, never in the node's state
        st["store"] = store_path
        store = EdgeStore(store_path)
        try:
            run = str(st["run_id"])
            store.put_private_key(f"{run}/nb_key", nb_key.private_bytes())
            store.put_private_key(f"{run}/agg_key", agg_key.private_bytes())
            store.set_contacts({k: float(v) for k, v in json.loads(str(st["weights"])).items()})
            store.set_status("run", {"run_id": run, "S": st["S"], "I": st["I"], "R": st["R"]})
        finally:
            store.close()
    else:
        st["nb_key"] = nb_key.private_bytes()
        st["agg_key"] = agg_key.private_bytes()
    st["day"] = -1
    context.state.config_records[_STATE] = st
    reply = ConfigRecord({"nb_pub": nb_key.public_bytes(), "agg_pub": agg_key.public_bytes()})
    return Message(RecordDict({"cfg": reply}), reply_to=message)


def _private_key(st: ConfigRecord, name: str) -> bytes:
    """The device's private key ``name``: from its encrypted store if it has one."""
    if "store" not in st:
        return bytes(st[name])
    store = EdgeStore(str(st["store"]))
    try:
        return store.get_private_key(f"{st['run_id']}/{name}")
    finally:
        store.close()


def _agent(st: ConfigRecord) -> AssistedNeighbourhoodAgent:
    keyring = Keyring(str(st["agent_id"]), str(st["run_id"]),
                      AgreementKey.from_private_bytes(_private_key(st, "nb_key")))
    return AssistedNeighbourhoodAgent(str(st["agent_id"]), str(st["run_id"]), keyring=keyring)


def _start(agent: AssistedNeighbourhoodAgent, st: ConfigRecord, plan: AgentPlan,
           keys: dict[str, bytes], value: float) -> list[Envelope]:
    agent.keyring.add_peers(keys)
    weights = {k: float(v) for k, v in json.loads(str(st["weights"])).items()}
    return agent.start(plan, value, weights=weights, weight_sum=float(st["weight_sum"]))


def _report_masks(st: ConfigRecord, day: int, peers: dict[str, bytes], width: int) -> torch.Tensor:
    """Σ of ± pairwise masks of this device for ``day`` (cancel over all devices)."""
    me = str(st["agent_id"])
    key = AgreementKey.from_private_bytes(_private_key(st, "agg_key"))
    total = torch.zeros(width, dtype=torch.int64)
    ctx = f"{st['run_id']}\x00report\x00{day}".encode()
    for peer, pub in sorted(peers.items()):
        if peer == me:
            continue
        lo, hi = sorted((me, peer))
        k = derive_key(key.exchange(pub), ctx + f"\x00{lo}\x00{hi}".encode(), label=_MASK_LABEL)
        stream = ring_keystream(k, width)
        total = total + stream if me < peer else total - stream  # int64 wraps: the ring
    return total


def _finish_day(st: ConfigRecord, cfg: ConfigRecord) -> list[int]:
    """Learn yesterday's neighbour sum, update the status, return the masked report."""
    day = int(st["day"])
    agent = _agent(st)
    prev_keys = {k: bytes.fromhex(v) for k, v in json.loads(str(st["keys"])).items()}
    _start(agent, st, AgentPlan.from_dict(json.loads(str(st["plan"]))), prev_keys,
           float(st["value"]))  # re-arm the state machine with yesterday's inputs
    envelopes = [Envelope.from_bytes(bytes(b)) for b in cfg["delivery"]]
    mask_sum = bytes(cfg["mask_sum"])
    res = agent.on_masked(envelopes, Envelope.from_bytes(mask_sum) if mask_sum else None)
    total = 0.0 if res is None else float(res.value)
    n, i = int(st["n"]), int(st["index"])
    state = {c: torch.tensor([float(st[c])]) for c in ("S", "I", "R")}
    state["new_infections"] = torch.zeros(1)
    model = SIR(beta=float(st["beta"]), gamma=float(st["gamma"]))
    degree = torch.tensor([float(st["degree"])])
    sums = torch.tensor([total], dtype=torch.float32)
    with torch.no_grad():
        uniforms = step_uniforms(int(st["seed"]), day, n, "cpu", 2)[:, i:i + 1]
        ctx = StepContext(day=day, dt=1.0, uniforms=uniforms,
                          estimator=get_estimator("straight_through"),
                          neighbour_sum=lambda x: sums, degree=degree,
                          attributes={"age_band": torch.zeros(1, dtype=torch.int8)}, extras={})
        p = float(infection_probability(sums, state["S"], degree, model.beta)[0])
        dp = float(infection_probability_dbeta(sums, state["S"], degree, model.beta)[0])
        new = model.step(state, ctx)
    for c in ("S", "I", "R"):
        st[c] = float(new[c][0])
    if "store" in st:
        store = EdgeStore(str(st["store"]))
        try:
            store.set_status("run", {"run_id": str(st["run_id"]), "day": day, "S": st["S"],
                                     "I": st["I"], "R": st["R"], "risk": p})
        finally:
            store.close()
    values = [st["S"], st["I"], st["R"], float(new["new_infections"][0]), p, dp]
    if not all(math.isfinite(v) for v in values):
        raise DeviceProtocolError("non-finite report")
    peers = {k: bytes.fromhex(v) for k, v in json.loads(str(cfg["agg_keys"])).items()}
    ring = FixedPointRing(frac_bits=int(st["frac_bits"]))
    encoded = ring.encode(torch.tensor(values, dtype=torch.float64), n_summands=len(peers))
    return (encoded + _report_masks(st, day, peers, len(values))).tolist()


@app.query("day")
def day(message: Message, context: Context) -> Message:
    """Finish the previous day (if delivered) and start the next one (if planned)."""
    cfg = _cfg(message)
    st = _state(context)
    out = ConfigRecord()
    if bool(cfg["has_delivery"]):
        if int(st["day"]) != int(cfg["delivery_day"]):
            raise DeviceProtocolError(f"delivery for day {cfg['delivery_day']}, "
                                      f"device is at day {st['day']}")
        out["report"] = _finish_day(st, cfg)
        out["report_day"] = int(st["day"])
    if bool(cfg["has_plan"]):
        plan = AgentPlan.from_dict(json.loads(str(cfg["plan"])))
        keys = {k: bytes.fromhex(v) for k, v in json.loads(str(cfg["keys"])).items()}
        value = float(st["I"])
        envs = _start(_agent(st), st, plan, keys, value)
        out["envelopes"] = [e.to_bytes() for e in envs]
        st["day"], st["plan"], st["keys"], st["value"] = plan.round, cfg["plan"], cfg["keys"], value
    return Message(RecordDict({"cfg": out}), reply_to=message)
