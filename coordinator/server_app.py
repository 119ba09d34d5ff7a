"""Flower ServerApp of the coordinator (Message API): a hybrid run over real or simulated
devices, one batched message per device per day.

Per day d: the relay plans the assisted secure neighbourhood round over the cross edges
(:mod:`coordinator.hybrid`); each device gets one message with yesterday's delivery and
today's plan, and answers with its masked contributions and its masked report of yesterday.
Coordinator-run proxies contribute the synthetic agents' status and learn the synthetic
agents' sums over their physical contacts; the synthetic population then steps centrally.
The sum of the devices' masked reports (pairwise masks cancel) gives the physical counts,
Σ p_i and Σ ∂p_i/∂β; the day is committed to the store with the synthetic checkpoint.

Run config keys (``[tool.flwr.app.config]``): num-days, population, scale, seed, beta,
gamma, initial-infected, db (SQLite path; default ``lpm-coordinator.db``), run-id.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from coordinator.hybrid import HybridSimulation, agent_name
from coordinator.runner import RunConfig, physical_agents
from coordinator.store import CoordinatorStore
from protocols.neighbourhood import AssistedNeighbourhoodAgent, NeighbourhoodRelay
from protocols.ring import FixedPointRing
from simulation.models import SIR
from simulation.population import synthesize

__all__ = ["app", "FederatedRun", "FederatedRunError", "REPORT_FIELDS"]

REPORT_FIELDS = ("S", "I", "R", "new_infections", "p", "dp_dbeta")  # = edge_agent's order
_log = logging.getLogger(__name__)

app = ServerApp()


class FederatedRunError(RuntimeError):
    """A device failed or answered out of protocol; the day cannot be completed."""


@dataclass
class _Device:
    node_id: int
    index: int  # agent index in the population
    name: str


class FederatedRun:
    """Drives a hybrid run over ``grid``; ``store``/``run_id`` persist each completed day."""

    def __init__(self, grid: Grid, cfg: RunConfig, *, store: CoordinatorStore | None = None,
                 run_id: str | None = None, timeout: float = 600.0,
                 on_day: Callable[[int, dict[str, object]], None] | None = None) -> None:
        self.grid, self.cfg, self.store, self.timeout, self.on_day = grid, cfg, store, timeout, \
            on_day
        self.run_id = run_id or f"fl-{int(time.time())}"
        self.ring = FixedPointRing()
        self.rows: list[dict[str, object]] = []

    # ------------------------------------------------------------------ transport
    def _exchange(self, action: str, contents: dict[int, ConfigRecord], group: str
                  ) -> dict[int, ConfigRecord]:
        msgs = [Message(RecordDict({"cfg": c}), dst_node_id=node, message_type=f"query.{action}",
                        group_id=group) for node, c in contents.items()]
        replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
        out: dict[int, ConfigRecord] = {}
        for r in replies:
            if r.has_error():
                raise FederatedRunError(f"node {r.metadata.src_node_id}: {r.error.reason}")
            out[r.metadata.src_node_id] = r.content.config_records["cfg"]
        missing = set(contents) - set(out)
        if missing:
            raise FederatedRunError(f"no reply from {len(missing)} device(s) to {action}")
        return out

    def _nodes(self, wait: float = 120.0) -> list[int]:
        deadline = time.time() + wait
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.cfg.devices or time.time() > deadline:
                break
            time.sleep(1.0)
        if not nodes:
            raise FederatedRunError("no devices connected")
        return nodes[: self.cfg.devices]

    # ------------------------------------------------------------------ run
    def run(self) -> list[dict[str, object]]:
        cfg = self.cfg
        pop = synthesize(cfg.population, seed=cfg.seed, scale=cfg.scale)
        nodes = self._nodes()
        phys = physical_agents(pop.n, len(nodes))
        sim = HybridSimulation(SIR(cfg.beta, cfg.gamma, cfg.initial_infected), pop, phys,
                               cfg.seed, remote=True)
        split = sim.split
        devices = {node: _Device(node, int(i), agent_name(int(i)))
                   for node, i in zip(nodes, phys.tolist(), strict=True)}
        by_name = {d.name: d for d in devices.values()}
        cross = split.cross_contacts()
        relay = NeighbourhoodRelay({t: [c for c, _ in cs] for t, cs in cross.items()},
                                   variant="assisted", run_id=self.run_id)
        # w as known to each contact: weights[c][t] = w_tc ; weight sums per target
        weights: dict[str, dict[str, float]] = {}
        for t, cs in cross.items():
            for c, w in cs:
                weights.setdefault(c, {})[t] = w
        wsum = {t: sum(w for _, w in cs) for t, cs in cross.items()}
        proxies = {name: AssistedNeighbourhoodAgent(name, self.run_id, ring=self.ring)
                   for name in set(cross) | set(weights) if name not in by_name}
        for name, agent in proxies.items():
            relay.register(name, agent.keyring.public_bytes())
        init = sim.physical_initial_state
        enrol = {}
        for k, (node, d) in enumerate(devices.items()):
            enrol[node] = ConfigRecord({
                "agent_id": d.name, "run_id": self.run_id, "seed": cfg.seed, "n": split.n,
                "index": d.index, "degree": float(split.degree[d.index]), "beta": cfg.beta,
                "gamma": cfg.gamma, "S": float(init["S"][k]), "I": float(init["I"][k]),
                "R": float(init["R"][k]), "weights": json.dumps(weights.get(d.name, {})),
                "weight_sum": float(wsum.get(d.name, 0.0)), "frac_bits": self.ring.frac_bits})
        pubs = self._exchange("enrol", enrol, "enrol")
        agg_keys = json.dumps({devices[n].name: bytes(c["agg_pub"]).hex()
                               for n, c in pubs.items()})
        for node, c in pubs.items():
            relay.register(devices[node].name, bytes(c["nb_pub"]))
        online = set(by_name) | set(proxies)
        pending: dict[str, tuple[list[bytes], bytes]] = {}
        pending_syn: dict[str, object] | None = None
        for day in range(cfg.days + 1):
            msgs: dict[int, ConfigRecord] = {}
            attempt = relay.begin_round(day, online) if day < cfg.days else None
            all_keys = relay.public_keys()  # dummies are created while planning
            for node, d in devices.items():
                c = ConfigRecord({"has_delivery": day > 0, "has_plan": attempt is not None,
                                  "delivery_day": day - 1, "agg_keys": agg_keys})
                if day > 0:
                    envs, mask_sum = pending.get(d.name, ([], b""))
                    c["delivery"], c["mask_sum"] = envs, mask_sum
                if attempt is not None:
                    plan = attempt.plans[d.name]
                    parties = {"relay", *(plan.own.roster if plan.own else ()),
                               *(m.target for m in plan.memberships)}
                    c["plan"] = json.dumps(plan.to_dict())
                    c["keys"] = json.dumps({p: all_keys[p].hex() for p in parties
                                            if p in all_keys})
                msgs[node] = c
            replies = self._exchange("day", msgs, f"day{day}")
            if day > 0:
                self._commit(day, pending_syn, [replies[n]["report"] for n in devices])
            if attempt is None:
                break
            uploads = {devices[n].name: [_env(b) for b in _list(r, "envelopes")]
                       for n, r in replies.items()}
            i_now = sim.state["I"]
            for name, agent in proxies.items():
                idx = int(name[1:])
                agent.keyring.add_peers(all_keys)
                uploads[name] = agent.start(attempt.plans[name], float(i_now[idx]),
                                            weights=weights.get(name),
                                            weight_sum=wsum.get(name))
            deliveries = attempt.route_phase1(uploads)
            cross_sums = torch.zeros(split.n, dtype=torch.float64)
            pending = {}
            for name, dl in deliveries.items():
                if name in proxies:
                    res = proxies[name].on_masked(dl.envelopes, dl.mask_sum)
                    if res is not None:
                        cross_sums[int(name[1:])] = res.value
                elif name in by_name:
                    pending[name] = ([e.to_bytes() for e in dl.envelopes],
                                     b"" if dl.mask_sum is None else dl.mask_sum.to_bytes())
            pending_syn = sim.step(cross_sums=cross_sums)
            self._state_blob = sim.state_bytes()
        return self.rows

    def _commit(self, day: int, syn: dict[str, object], reports: Iterable[list[int]]) -> None:
        total = torch.zeros(len(REPORT_FIELDS), dtype=torch.int64)
        for rep in reports:
            if len(rep) != len(REPORT_FIELDS):
                raise FederatedRunError("malformed device report")
            total += torch.tensor(rep, dtype=torch.int64)
        phys = dict(zip(REPORT_FIELDS, self.ring.decode(total).tolist(), strict=True))
        row = dict(syn)
        for c in ("S", "I", "R", "new_infections"):
            row[c] = float(syn[c]) + round(phys[c])
        row.update({"physical_I": round(phys["I"]),
                    "physical_new_infections": round(phys["new_infections"]),
                    "physical_expected_new": phys["p"], "physical_dp_dbeta": phys["dp_dbeta"]})
        self.rows.append(row)
        if self.store is not None:
            self.store.commit_round(self.run_id, day, row, state=self._state_blob)
        if self.on_day is not None:
            self.on_day(day, row)


def _list(rec: ConfigRecord, key: str) -> list:
    return list(rec[key]) if key in rec else []


def _env(b: bytes):
    from protocols.neighbourhood import Envelope

    return Envelope.from_bytes(bytes(b))


def config_from_context(context: Context) -> RunConfig:
    rc = context.run_config

    def get(k: str, default):
        return type(default)(rc.get(k, default))

    return RunConfig(population=get("population", "tiny"), scale=get("scale", 1.0),
                     days=get("num-days", 5), seed=get("seed", 0),
                     devices=max(get("devices", 0), 1), beta=get("beta", 0.5),
                     gamma=get("gamma", 0.1), initial_infected=get("initial-infected", 0.01))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run`` and ``flwr.simulation.run_simulation``."""
    torch.set_num_threads(1)
    cfg = config_from_context(context)
    db = str(context.run_config.get("db", "lpm-coordinator.db"))
    store = CoordinatorStore(db)
    run_id = str(context.run_config.get("run-id", "")) or None
    if int(context.run_config.get("devices", 0)) <= 0:  # 0: every node connected (stable 5 s)
        seen, stable_since, deadline = -1, time.time(), time.time() + 300
        while (time.time() - stable_since < 5.0 or seen == 0) and time.time() < deadline:
            n_nodes = len(list(grid.get_node_ids()))
            if n_nodes != seen:
                seen, stable_since = n_nodes, time.time()
            time.sleep(0.5)
        cfg = RunConfig(**{**cfg.to_dict(), "devices": seen})
    if run_id is None or run_id not in {r.id for r in store.list_runs()}:
        run_id = store.create_run(cfg.to_dict(), cfg.days, run_id=run_id)
    store.set_status(run_id, "running")
    try:
        FederatedRun(grid, cfg, store=store, run_id=run_id,
                     on_day=lambda d, r: _log.info("day %d: I=%s", d, r["I"])).run()
    except Exception as exc:
        store.set_status(run_id, "failed", f"{type(exc).__name__}: {exc}")
        raise
    store.set_status(run_id, "completed")
