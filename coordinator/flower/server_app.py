"""Flower ServerApp of the coordinator (Message API): a hybrid run over real or simulated
devices, with online federated calibration. Wire format: :mod:`protocols.daily`.

Per day d: the relay plans the assisted secure neighbourhood round over the cross edges
(:mod:`coordinator.hybrid`); every enrolled device gets one ``query.day`` message with
yesterday's delivery, today's plan and the model's θ, and answers with its report of
yesterday for multi-round SecAgg+ and its masked contributions of today. SecAgg+ keys are
agreed once per epoch (:class:`coordinator.flower.secagg.ReportRound`): while the day's
roster equals the epoch's, the day reply carries the masked report and two ``query.stage``
exchanges (consistency, unmask) finish the day; a changed roster (dropout, new or returning
device, restart) starts a new epoch: the day reply is the key advertisement and a third
stage (masked_input) carries the rosters. The decoded sum gives the physical counts, Σ p_i
and Σ ∂p_i/∂β over exactly the surviving devices. Coordinator-run
proxies contribute the synthetic agents' status; the synthetic population then steps
centrally. The coordinator never holds a physical agent's state: their rows in the
synthetic state stay zero, and a device's events use a seed that never leaves it.

Dropouts: a device that does not answer (or errors) is out of that day: excluded exactly from
the report round (SecAgg+ survivors), and — neighbourhood policy — its contacts' sums for the
day leave it out (the relay's dropout policy). It is asked again every day; when it answers
it catches up (keeps its status over the missed days and joins the day's plan). A day with
fewer than ``min-devices`` surviving reports fails with an error naming the missing nodes.

Resume and ownership: a run is owned through a lease in the store (renewed every day); a
ServerApp started again with the same ``run-id`` resumes from the last committed day (the
synthetic checkpoint; devices restore their own state of that day from their stores, a
device without one is left out), and ``lpm coordinator`` never runs a federated run.

Run config keys (``[tool.flwr.app.config]``): num-days, population, scale, seed, devices,
beta, gamma, initial-infected, db, run-id, min-devices, shared-seed (equivalence tests only),
calibrate ("" or "beta"), calibrate-every, calibrate-steps, beta-init, beta-segment-days,
observed-csv (per-day ``new_infections``; default: the run's own reported counts),
exchange-timeout (seconds a message exchange waits for devices; a late device is out),
tangents (exact decentralised gradients: every device carries ∂state/∂β, the neighbourhood
sum carries the tangents in a second round, the SecAgg'd report its ∂new_i/∂β; the
committed row's ``d_new_dbeta`` is the full-path derivative; with calibrate, θ is fitted
with the full-path model of :mod:`coordinator.calibration_path` instead of Eq. 11),
estimator (the step's gradient estimator, devices and synthetic agents alike).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from coordinator.calibration import (
    CalibrationSettings,
    OnlineCalibrator,
    pack_checkpoint,
    read_observed_csv,
    unpack_checkpoint,
)
from coordinator.flower.secagg import DROPOUT_PLAN, ReportEpoch, ReportRound
from coordinator.hybrid import HybridSimulation, agent_name
from coordinator.runner import DEFAULT_MIN_DEVICES, RunConfig, physical_agents, take_lease
from coordinator.store import CoordinatorStore
from protocols.daily import (
    REPORT_FIELDS,
    TANGENT_BOUND,
    DayReply,
    DayRequest,
    EnrolReply,
    EnrolRequest,
    Keys,
    MessageType,
    StageReply,
    StageRequest,
    WireFormatError,
    tangent_round,
    value_round,
)
from protocols.keys import AgreementKey
from protocols.neighbourhood import (
    AssistedNeighbourhoodAgent,
    Envelope,
    Keyring,
    NeighbourhoodRelay,
)
from protocols.ring import FixedPointRing
from protocols.secagg import SecAggAbortError
from simulation.models import SIR
from simulation.population import synthesize

__all__ = ["app", "FederatedRun", "FederatedRunError", "FederatedSettings", "FlowerTransport",
           "MinCohortError", "Transport", "REPORT_FIELDS", "DEFAULT_MIN_DEVICES"]

LEASE_SECONDS = 900.0
TANGENT_FRAC_BITS = 40  # 16 fractional bits would leave ~1e-5 on each tangent term  # renewed every committed day
_log = logging.getLogger(__name__)

app = ServerApp()


class FederatedRunError(RuntimeError):
    """A device failed or answered out of protocol; the day cannot be completed."""


class MinCohortError(FederatedRunError):
    """Fewer devices than the minimum cohort: aggregates would not be published."""


class Transport(Protocol):
    """Message transport between the coordinator and the devices (Flower or the fleet)."""

    def node_ids(self) -> list[int]: ...

    def exchange(self, message_type: str, contents: Mapping[int, dict[str, Any]], group: str,
                 timeout: float) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
        """Send one message per node; returns (replies, {node: failure reason})."""
        ...


POLL_SECONDS = 0.25  # how often an exchange asks the Grid for replies


class FlowerTransport:
    """:class:`Transport` over a Flower ``Grid`` (deployment or simulation engine). Replies
    are pulled every ``poll`` seconds: Flower's deployment ``Grid.send_and_receive`` sleeps
    3 s between pulls, a wait every exchange of a day would pay."""

    def __init__(self, grid: Grid, poll: float = POLL_SECONDS) -> None:
        self.grid, self.poll = grid, poll

    def node_ids(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def exchange(self, message_type: str, contents: Mapping[int, dict[str, Any]], group: str,
                 timeout: float) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
        msgs = [Message(RecordDict({Keys.RECORD: ConfigRecord(c)}), dst_node_id=node,
                        message_type=message_type, group_id=group)
                for node, c in contents.items()]
        out: dict[int, dict[str, Any]] = {}
        failed: dict[int, str] = {}
        for r in self._send_and_receive(msgs, timeout):
            src = r.metadata.src_node_id
            if r.has_error():
                failed[src] = str(r.error.reason)
            else:
                out[src] = dict(r.content.config_records[Keys.RECORD])
        for node in set(contents) - set(out) - set(failed):
            failed[node] = "no reply"
        # a reply from a node we did not ask, or an error attributed to one: not ours
        return ({n: c for n, c in out.items() if n in contents},
                {n: f for n, f in failed.items() if n in contents})

    def _send_and_receive(self, msgs: list[Message], timeout: float) -> list[Message]:
        """``Grid.send_and_receive`` with a ``poll``-second pull interval: push, then pull
        until every message has its reply or ``timeout`` seconds have passed."""
        pending = {m for m in self.grid.push_messages(msgs) if m}  # None: not pushed
        end = time.time() + timeout
        got: list[Message] = []
        while pending:
            replies = list(self.grid.pull_messages(pending))
            got.extend(replies)
            pending -= {r.metadata.reply_to_message_id for r in replies}
            if not pending or time.time() >= end:
                break
            time.sleep(self.poll)
        return got


@dataclass(frozen=True)
class FederatedSettings:
    """How the run treats devices: minimum cohort, the equivalence-test seed mode,
    calibration, the per-exchange timeout and the planned share of devices missing per day
    (``dropout_plan``: sizes the daily reports' SecAgg+ graph, docs/secagg.md)."""

    min_devices: int = DEFAULT_MIN_DEVICES
    shared_seed: bool = False
    calibration: CalibrationSettings | None = None
    timeout: float = 600.0
    tangents: bool = False  # exact decentralised gradients (forward tangents ∂state/∂β)
    estimator: str = "straight_through"  # the step's estimator, devices and synthetic alike
    frac_bits: int | None = None  # neighbourhood ring precision (default 16; 40 with tangents)
    dropout_plan: float = DROPOUT_PLAN

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout_plan < 0.5:
            raise FederatedRunError(f"dropout-plan {self.dropout_plan!r} outside [0, 0.5): "
                                    "SecAgg+ needs a majority of each device's neighbours")


@dataclass
class _Device:
    node_id: int
    index: int  # agent index in the population
    name: str
    identity: bytes = b""
    missed: list[int] = field(default_factory=list)


class FederatedRun:
    """Drives a hybrid run over ``transport``; ``store``/``run_id`` persist each day."""

    def __init__(self, transport: Transport | Grid, cfg: RunConfig, *,
                 settings: FederatedSettings | None = None,
                 store: CoordinatorStore | None = None, run_id: str | None = None,
                 on_day: Callable[[int, dict[str, object]], None] | None = None,
                 resume: bool = False, lease_owner: str | None = None,
                 procs_group: Any = None) -> None:
        self.procs_group = procs_group  # partitioned synthetic part (coordinator.fleet_procs)
        self.transport: Transport = FlowerTransport(transport) \
            if isinstance(transport, Grid) else transport
        self.cfg, self.store, self.on_day = cfg, store, on_day
        self.settings = settings or FederatedSettings()
        self.run_id = run_id or f"fl-{int(time.time())}"
        bits = self.settings.frac_bits
        self.ring = FixedPointRing(bits if bits is not None else
                                   (TANGENT_FRAC_BITS if self.settings.tangents else 16))
        self.rows: list[dict[str, object]] = []
        self.calibrator = None if self.settings.calibration is None else \
            OnlineCalibrator(self.settings.calibration)
        self.resume, self.lease_owner = resume, lease_owner
        if resume and store is None:
            raise FederatedRunError("resuming a run needs its store")
        self.sim: HybridSimulation | None = None  # synthetic agents only (physical rows 0)
        self.survivors: dict[int, list[int]] = {}  # day -> node ids whose report is in it
        self.epochs: dict[int, int] = {}  # day -> SecAgg+ key epoch of its report round
        self._tangent_arrays: dict[str, Any] = {}  # the synthetic tangents (checkpoint)
        #: day -> {"aborts": why attempts aborted, "left_out": devices per re-issued set}
        self.secagg_log: dict[int, dict[str, list]] = {}

    # ------------------------------------------------------------------ transport
    def _nodes(self, wait: float = 120.0) -> list[int]:
        deadline = time.time() + wait
        while True:
            nodes = self.transport.node_ids()
            if len(nodes) >= self.cfg.devices or time.time() > deadline:
                break
            time.sleep(1.0)
        nodes = nodes[: self.cfg.devices]
        if len(nodes) < self.settings.min_devices:
            raise MinCohortError(f"{len(nodes)} device(s) connected, the minimum cohort is "
                                 f"{self.settings.min_devices}")
        return nodes

    def _check_cohort(self, day: int, survivors: list[str], devices: Mapping[str, _Device],
                      stage: str) -> None:
        if len(survivors) >= self.settings.min_devices:
            return
        missing = sorted(set(devices) - set(survivors))
        desc = _describe(devices, missing)
        raise MinCohortError(f"day {day}: {len(survivors)} device(s) left at {stage}, the "
                             f"minimum cohort is {self.settings.min_devices}; missing: {desc}")

    # ------------------------------------------------------------------ run
    def run(self) -> list[dict[str, object]]:
        cfg, settings = self.cfg, self.settings
        pop = synthesize(cfg.population, seed=cfg.seed, scale=cfg.scale)
        nodes = self._nodes()
        phys = physical_agents(pop.n, len(nodes))
        tangents = settings.tangents
        sim = HybridSimulation(SIR(cfg.beta, cfg.gamma, cfg.initial_infected), pop, phys,
                               cfg.seed, remote=True, tangents=tangents,
                               estimator=settings.estimator, procs_group=self.procs_group)
        self.sim = sim
        ranks_replay = None  # the full-path replay over the ranks (they serve rank 0's fits)
        if tangents and self.calibrator is not None and self.procs_group is not None:
            from simulation.distributed.replay import PartitionedReplay
            ranks_replay = PartitionedReplay(
                SIR(cfg.beta, cfg.gamma, cfg.initial_infected), sim, cfg.seed,
                settings.estimator, beta_devices=cfg.beta)
            self.calibrator.replay = cast(Any, ranks_replay)  # SyntheticReplay's API
        elif tangents and self.calibrator is not None:  # full-path calibration (no resume)
            from coordinator.calibration_path import SyntheticReplay
            self.calibrator.replay = SyntheticReplay(
                SIR(cfg.beta, cfg.gamma, cfg.initial_infected), sim.split, sim.state, cfg.seed,
                settings.estimator, beta_devices=cfg.beta)
        start = 0
        point = self.store.resume(self.run_id) if self.resume and self.store else None
        if point is not None and tangents and self.procs_group is not None:
            raise FederatedRunError(f"run {self.run_id} carries tangents over several ranks, "
                                    "whose checkpoint does not keep them: it cannot resume")
        if point is not None:  # the checkpoint of the last committed day
            sim_state, arrays = unpack_checkpoint(point.state)
            sim.load_state(sim_state)
            start = sim.day
            if tangents:  # the synthetic agents' ∂state/∂β at the end of day start − 1
                sim.tangent = _restore_tangent(self.run_id, sim.tangent, arrays or {})
            if self.calibrator is not None:  # θ and the calibration history of days 1..start
                if arrays is None or "cal_theta" not in arrays:
                    raise FederatedRunError(f"run {self.run_id} was checkpointed without "
                                            "calibration; resume it without --calibrate")
                self.calibrator.restore_state(arrays)
            _log.info("resuming run %s at day %d", self.run_id, start)
        split = sim.split
        devices = {agent_name(int(i)): _Device(node, int(i), agent_name(int(i)))
                   for node, i in zip(nodes, phys.tolist(), strict=True)}
        by_node = {d.node_id: d for d in devices.values()}
        cross = split.cross_contacts()
        relay = NeighbourhoodRelay({t: [c for c, _ in cs] for t, cs in cross.items()},
                                   variant="assisted", run_id=self.run_id)
        weights: dict[str, dict[str, float]] = {}  # weights[c][t] = w_tc as known to c
        for t, cs in cross.items():
            for c, w in cs:
                weights.setdefault(c, {})[t] = w
        wsum = {t: sum(w for _, w in cs) for t, cs in cross.items()}
        proxy_keys = {name: AgreementKey.generate()
                      for name in set(cross) | set(weights) if name not in devices}
        proxies = {name: AssistedNeighbourhoodAgent(name, self.run_id, ring=self.ring,
                                                    keyring=Keyring(name, self.run_id, k,
                                                                    party=relay.party))
                   for name, k in proxy_keys.items()}
        # the tangent round's proxies: the same keys, their own state machines
        tproxies = {name: AssistedNeighbourhoodAgent(name, self.run_id, ring=self.ring,
                                                     keyring=Keyring(name, self.run_id, k,
                                                                     party=relay.party),
                                                     value_bound=TANGENT_BOUND)
                    for name, k in proxy_keys.items()} if tangents else {}
        for name, agent in proxies.items():
            relay.register(name, agent.keyring.public_bytes())
        init = sim.physical_initial_state
        enrol = {}
        for k, d in enumerate(devices.values()):
            enrol[d.node_id] = EnrolRequest(
                agent_id=d.name, run_id=self.run_id, n=split.n, index=d.index,
                degree=float(split.degree[d.index]), beta=cfg.beta, gamma=cfg.gamma,
                S=float(init["S"][k]) if settings.shared_seed else 0.0,
                I=float(init["I"][k]) if settings.shared_seed else 0.0,
                R=float(init["R"][k]) if settings.shared_seed else 0.0,
                initial_infected=cfg.initial_infected,
                weights=json.dumps(weights.get(d.name, {})),
                weight_sum=float(wsum.get(d.name, 0.0)), frac_bits=self.ring.frac_bits,
                secagg_index=k, shared_seed=settings.shared_seed,
                uniform_seed=cfg.seed if settings.shared_seed else 0,
                resume_day=start, tangents=tangents, estimator=settings.estimator).to_dict()
        del init  # initial physical states went to their devices only
        sim._initial_physical = {}
        replies, failed = self.transport.exchange(MessageType.ENROL, enrol, "enrol",
                                                  settings.timeout)
        for node, content in replies.items():
            try:
                rep = EnrolReply.from_dict(content)
            except WireFormatError as exc:
                failed[node] = str(exc)
                continue
            by_node[node].identity = rep.identity
            relay.register(by_node[node].name, rep.nb_pub)
        enrolled = {n: d for n, d in devices.items() if d.identity}
        self._check_cohort(0, list(enrolled), devices, "enrolment")
        pending: dict[str, tuple[list[bytes], bytes]] = {}
        tpending: dict[str, tuple[list[bytes], bytes]] = {}
        pending_syn: dict[str, object] | None = None
        pending_theta = 0.0
        epoch: ReportEpoch | None = None  # the SecAgg+ key epoch of the daily reports
        for day in range(start, cfg.days + 1):
            theta = self.calibrator.beta_for(day) if self.calibrator else cfg.beta
            online = set(enrolled) | set(proxies)
            attempt = relay.begin_round(value_round(day, tangents), online) \
                if day < cfg.days else None
            plans = attempt.plans if attempt is not None else {}  # a property: build it once
            tattempt = relay.begin_round(tangent_round(day), online) \
                if tangents and attempt is not None else None
            tplans = tattempt.plans if tattempt is not None else {}
            all_keys = relay.public_keys()
            roster = sorted(pending) if day > start else []
            report = None
            if roster:
                report = ReportRound(self.run_id, day - 1, roster,
                                     [devices[r].identity for r in roster],
                                     min_survivors=min(settings.min_devices, len(roster)),
                                     epoch=epoch, dropout=settings.dropout_plan) \
                    if len(roster) >= 3 else None  # SecAgg+ needs ≥ 3 (never a sum of 1–2)
                epoch = report.epoch if report is not None else None
            msgs: dict[int, dict[str, Any]] = {}
            for name, d in enrolled.items():
                req = DayRequest(day=day, theta_beta=theta, has_delivery=name in pending,
                                 has_plan=attempt is not None)
                if name in pending:
                    req.delivery, req.mask_sum = list(pending[name][0]), pending[name][1]
                    if report is not None:
                        req.secagg_epoch = report.config.round
                        if report.new_epoch:  # keys agreed once per epoch
                            req.secagg_config = report.config.to_bytes()
                            req.registry_index = report.registry_for(name)
                            req.registry = [devices[report.roster[i]].identity
                                            for i in req.registry_index]
                if name in tpending:
                    req.tdelivery, req.tmask_sum = list(tpending[name][0]), tpending[name][1]
                if attempt is not None:
                    plan = plans[name]
                    req.plan = json.dumps(plan.to_dict())
                    req.keys = json.dumps({p: all_keys[p].hex() for p in _parties(plan)
                                           if p in all_keys})
                if tattempt is not None:
                    tplan = tplans[name]
                    req.tplan = json.dumps(tplan.to_dict())
                    req.tkeys = json.dumps({p: all_keys[p].hex() for p in _parties(tplan)
                                            if p in all_keys})
                msgs[d.node_id] = req.to_dict()
            raw, failed = self.transport.exchange(MessageType.DAY, msgs, f"day{day}",
                                                  settings.timeout)
            day_replies: dict[str, DayReply] = {}
            for node, content in raw.items():
                try:
                    day_replies[by_node[node].name] = DayReply.from_dict(content)
                except WireFormatError as exc:
                    failed[node] = str(exc)
            for node, why in failed.items():
                by_node[node].missed.append(day)
                _log.warning("day %d: node %d (%s) out: %s", day, node, by_node[node].name, why)
            if day > start:
                self._finish_report(day, report, roster, day_replies, devices, pending_syn,
                                    pending_theta, sim)
            if attempt is None:
                break
            cross_sums, pending = _relay_round(
                attempt, proxies, plans, {m: r.envelopes for m, r in day_replies.items()},
                sim.cross_infected(), all_keys, weights, wsum, day_replies, split.n)
            cross_dsums = None
            if tattempt is not None:
                boundary = sim.cross_tangent()
                _check_tangent_bound(boundary, tproxies, day + 1, settings.estimator)
                cross_dsums, tpending = _relay_round(
                    tattempt, tproxies, tplans,
                    {m: r.tenvelopes for m, r in day_replies.items()}, boundary,
                    all_keys, weights, wsum, day_replies, split.n)
            pending_syn = sim.step(cross_sums=cross_sums, cross_dsums=cross_dsums)
            if self.calibrator is not None and self.calibrator.replay is not None:
                assert cross_dsums is not None
                self.calibrator.replay.record(sim.day - 1, cross_sums, cross_dsums)
            pending_theta = theta
            self._state_blob = sim.state_bytes()
            if tangents:  # the checkpoint keeps them: a resumed run continues the same path
                self._tangent_arrays = {f"{_TANGENT}{k}": v.detach().numpy().copy()
                                        for k, v in sim.tangent.items()}
        if ranks_replay is not None:  # the last fit is done: free the ranks
            ranks_replay.release()
        return self.rows

    def _finish_report(self, day: int, report: ReportRound | None, roster: list[str],
                       replies: Mapping[str, DayReply], devices: Mapping[str, _Device],
                       syn: dict[str, object] | None, theta: float,
                       sim: HybridSimulation) -> None:
        """Run the report round of day ``day − 1`` over the live roster and commit it."""
        if report is None:
            self._check_cohort(day, [], devices, "report")
            return
        group = f"{self.run_id}/{day - 1}"
        for name in roster:
            r = replies.get(name)
            blob = None if r is None or r.report_day != day - 1 else \
                (r.advertise if report.new_epoch else r.masked)
            if blob:
                report.receive(name, blob)
        name_to_node = {n: devices[n].node_id for n in roster}
        try:
            while True:
                out = report.advance()
                stage = report.stage
                if stage is None:  # decoded
                    break
                msgs = {name_to_node[n]: StageRequest(stage=stage, day=day - 1,
                                                      payload=b).to_dict()
                        for n, b in out.items()}
                tag = report.exchange_tag
                raw, failed = self.transport.exchange(MessageType.STAGE, msgs,
                                                      f"{group}/{tag}", self.settings.timeout)
                node_to_name = {v: k for k, v in name_to_node.items()}
                for node, c in raw.items():
                    try:
                        report.receive(node_to_name[node], StageReply.from_dict(c).payload)
                    except WireFormatError as exc:
                        report.rejected[node_to_name[node]] = str(exc)
                for node, why in failed.items():
                    devices[node_to_name[node]].missed.append(day)
                    _log.warning("day %d %s: node %d out: %s", day, stage, node, why)
        except SecAggAbortError as exc:
            lost = sorted(n for n in devices if day in devices[n].missed or n in report.rejected)
            desc = _describe(devices, lost)
            short = len(set(roster) - set(lost)) < self.settings.min_devices
            why = "; ".join(f"{n}: {r}" for n, r in sorted(report.rejected.items())[:3])
            raise (MinCohortError if short else FederatedRunError)(
                f"day {day}: secure aggregation of the day-{day - 1} reports aborted: {exc} "
                f"(minimum cohort {self.settings.min_devices}); devices out today: {desc}"
                + (f"; messages refused ({len(report.rejected)}), e.g. {why}" if why else "")
            ) from exc
        for gone in report.left_out:
            _log.warning("day %d: %d device(s) dropped after masking next to an offline "
                         "one; the survivor set was re-issued without them: %s", day,
                         len(gone), ", ".join(gone[:5]))
        self.secagg_log[day] = {"aborts": list(report.aborts),
                                "left_out": [list(o) for o in report.left_out]}
        for why in report.aborts:
            _log.warning("day %d: SecAgg+ attempt aborted before any reveal (%s); the day "
                         "was attempted again in the same key epoch", day, why)
        survivors = report.survivors()
        self._check_cohort(day, survivors, devices, "report aggregation")
        self.survivors[day] = sorted(devices[s].node_id for s in survivors)
        self.epochs[day] = report.config.round
        phys = dict(zip(REPORT_FIELDS, report.total().tolist(), strict=True))
        self._commit(day, syn or {}, phys, survivors, theta, sim)

    def _commit(self, day: int, syn: dict[str, object], phys: dict[str, float],
                survivors: list[str], theta: float, sim: HybridSimulation) -> None:
        row = dict(syn)
        for c in ("S", "I", "R", "new_infections"):
            row[c] = float(cast(float, syn[c])) + round(phys[c])
        row.update({"physical_I": round(phys["I"]),
                    "physical_new_infections": round(phys["new_infections"]),
                    "physical_expected_new": phys["p"], "physical_dp_dbeta": phys["dp_dbeta"],
                    "survivors": len(survivors)})
        if self.settings.tangents:  # full-path ∂new/∂β: synthetic (here) + devices (SecAgg'd)
            row["d_new_dbeta_physical"] = phys["d_new_dbeta"]
            row["d_new_dbeta"] = float(cast(float, syn["d_new_dbeta_synthetic"])) \
                + phys["d_new_dbeta"]
        if round(phys["count"]) != len(survivors):
            raise FederatedRunError(f"day {day}: the aggregate sums {phys['count']:.0f} reports "
                                    f"but {len(survivors)} devices survived")
        if self.calibrator is not None:
            cal = self.calibrator
            y = cal.observed_for(day - 1, float(cast(float, row["new_infections"])))
            if cal.full_path:  # the devices' count and full-path ∂count/∂β (SecAgg'd)
                cal.add_path_day(day - 1, phys["new_infections"], phys["d_new_dbeta"], y)
            else:
                cal.add_day(day - 1, sim.last_synthetic_hazard, phys["p"], phys["dp_dbeta"],
                            theta, y, susceptible=sim.last_synthetic_susceptible)
            loss, g_syn, g_dev = cal.loss_and_grad()
            cal.update(day - 1)
            row.update({"theta_beta": cal.beta_for(day), "theta": {"beta": list(cal.theta)},
                        "loss": loss, "grad_synthetic": g_syn, "grad_devices": g_dev,
                        "observed": y})
        self.rows.append(row)
        if self.store is not None and self.lease_owner is not None:  # renew; fails if lost
            self.store.acquire_lease(self.run_id, self.lease_owner, "serverapp", LEASE_SECONDS)
        if self.store is not None:
            self.store.commit_round(self.run_id, day, row,
                                    state=pack_checkpoint(self._state_blob, self.calibrator,
                                                          self._tangent_arrays))
        if self.on_day is not None:
            self.on_day(day, row)


_TANGENT = "tangent_"  # checkpoint array names of the synthetic agents' tangents


def _restore_tangent(run_id: str, like: Mapping[str, torch.Tensor],
                     arrays: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The synthetic tangents saved by the run's checkpoint, shaped and typed as ``like``."""
    out = {}
    for k, v in like.items():
        a = arrays.get(f"{_TANGENT}{k}")
        if a is None or tuple(a.shape) != tuple(v.shape):
            raise FederatedRunError(f"run {run_id} carries tangents but its checkpoint keeps "
                                    f"no synthetic ∂{k}/∂β of the right shape: it cannot "
                                    "resume exactly")
        out[k] = torch.from_numpy(a.copy()).to(v.dtype)
    return out


def _relay_round(attempt: Any, proxies: Mapping[str, AssistedNeighbourhoodAgent],
                 plans: Mapping[str, Any], device_uploads: Mapping[str, Sequence[bytes]],
                 values: torch.Tensor, keys: Mapping[str, bytes],
                 weights: Mapping[str, dict[str, float]], wsum: Mapping[str, float],
                 replies: Mapping[str, DayReply], n: int
                 ) -> tuple[torch.Tensor, dict[str, tuple[list[bytes], bytes]]]:
    """One neighbourhood round at the coordinator (the value round or the tangent round):
    the devices' uploads, the proxies' (synthetic agents with device contacts) own starts
    with ``values``, routed through ``attempt``; then :func:`_route`."""
    uploads = {name: [Envelope.from_bytes(b) for b in blobs]
               for name, blobs in device_uploads.items()}
    for name, agent in proxies.items():
        plan = plans[name]
        agent.keyring.add_peers({p: keys[p] for p in _parties(plan) if p in keys})
        uploads[name] = agent.start(plan, float(values[int(name[1:])]),
                                    weights=weights.get(name), weight_sum=wsum.get(name))
    return _route(attempt.route_phase1(uploads), proxies, replies, n)


def _check_tangent_bound(boundary: torch.Tensor, proxies: Mapping[str, Any], day: int,
                         estimator: str) -> None:
    """Refuse a tangent round whose synthetic contributions (the ``proxies``' agents, the
    synthetic contacts of devices) pass the public bound, with a clear error (the proxies
    would fail mid-round). Straight-through tangents are a
    surrogate that every agent, infected or not, accumulates and passes on: over a long run
    they grow without bound (oxford × 0.67 at β 0.8: max |∂I_i/∂β| 1278 on day 22, 72078 on
    day 30; the expected estimator's stay below 2; docs/calibration.md)."""
    rows = torch.tensor([int(name[1:]) for name in proxies], dtype=torch.long)
    worst = float(boundary[rows].abs().max()) if rows.numel() else 0.0
    if not worst <= TANGENT_BOUND:
        hint = ("straight-through tangents grow without bound over a long run; "
                "--estimator expected keeps them bounded" if estimator == "straight_through"
                else "the run's tangents grow past what the protocol admits")
        raise FederatedRunError(f"day {day}: a synthetic agent's ∂I/∂β is {worst:.4g}, past "
                                f"the neighbourhood protocol's public tangent bound "
                                f"{TANGENT_BOUND:g} (estimator {estimator}: {hint})")


def _route(deliveries: Mapping[str, Any], proxies: Mapping[str, AssistedNeighbourhoodAgent],
           replies: Mapping[str, DayReply], n: int
           ) -> tuple[torch.Tensor, dict[str, tuple[list[bytes], bytes]]]:
    """One neighbourhood round's phase-1 deliveries: the proxies' (synthetic agents') sums,
    decoded here, and each device's delivery, kept for tomorrow's day message."""
    sums = torch.zeros(n, dtype=torch.float64)
    pending: dict[str, tuple[list[bytes], bytes]] = {}
    for name, dl in deliveries.items():
        if name in proxies:
            res = proxies[name].on_masked(dl.envelopes, dl.mask_sum)
            if res is not None:
                sums[int(name[1:])] = res.value
        elif name in replies:  # only devices that took part today
            pending[name] = ([e.to_bytes() for e in dl.envelopes],
                             b"" if dl.mask_sum is None else dl.mask_sum.to_bytes())
    return sums, pending


def _parties(plan: Any) -> set[str]:
    """The parties whose public keys an agent needs for ``plan`` (its roster, its targets
    and the relay): O(degree), never every key of the run."""
    return {"relay", *(plan.own.roster if plan.own else ()), *(m.target for m in plan.memberships)}


def _describe(devices: Mapping[str, _Device], names: Sequence[str], limit: int = 20) -> str:
    """``node 4 (a300), node 9 (a799)`` for an error message; the first ``limit`` and a count."""
    desc = ", ".join(f"node {devices[n].node_id} ({n})" for n in names[:limit]) or "none"
    return desc + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _cfg_get(rc: Mapping[str, Any], k: str, default: Any) -> Any:
    v = rc.get(k, default)
    if isinstance(default, bool):
        return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
    return type(default)(v)


# Flower run-config keys ([tool.flwr.app.config], kebab-case) of RunConfig's fields
_RUN_KEYS = {"population": "population", "scale": "scale", "num-days": "days", "seed": "seed",
             "devices": "devices", "beta": "beta", "gamma": "gamma",
             "initial-infected": "initial_infected"}


def config_from_context(context: Context) -> RunConfig:
    """The run's :class:`RunConfig` from the Flower run config (absent keys take RunConfig's
    defaults); ``devices = 0`` (every connected node) stands at 1 until the nodes are counted."""
    rc = context.run_config
    fields: dict[str, Any] = {field: rc[key] for key, field in _RUN_KEYS.items() if key in rc}
    if isinstance(fields.get("devices"), int) and fields["devices"] <= 0:
        fields["devices"] = 1
    return RunConfig.make(**fields)


def settings_from_context(context: Context) -> FederatedSettings:
    """Minimum cohort, seed mode and calibration from the run config."""
    rc = context.run_config
    cal = None
    if _cfg_get(rc, "calibrate", ""):
        csv_path = _cfg_get(rc, "observed-csv", "")
        cal = CalibrationSettings(
            params=tuple(p for p in _cfg_get(rc, "calibrate", "").split(",") if p),
            beta_init=_cfg_get(rc, "beta-init", 0.3),
            every=_cfg_get(rc, "calibrate-every", 1), steps=_cfg_get(rc, "calibrate-steps", 5),
            segment_days=_cfg_get(rc, "beta-segment-days", 0),
            observed=tuple(read_observed_csv(csv_path)) if csv_path else None)
    return FederatedSettings(min_devices=_cfg_get(rc, "min-devices", DEFAULT_MIN_DEVICES),
                             shared_seed=_cfg_get(rc, "shared-seed", False), calibration=cal,
                             timeout=_cfg_get(rc, "exchange-timeout", 600.0),
                             tangents=_cfg_get(rc, "tangents", False),
                             estimator=_cfg_get(rc, "estimator", "straight_through"),
                             dropout_plan=_cfg_get(rc, "dropout-plan", DROPOUT_PLAN))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run`` and ``flwr.simulation.run_simulation``."""
    torch.set_num_threads(1)
    cfg = config_from_context(context)
    settings = settings_from_context(context)
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
        cfg = cfg.replace(devices=max(seen, 1))
    if cfg.devices < settings.min_devices:
        raise MinCohortError(f"devices={cfg.devices} is below the minimum cohort "
                             f"min-devices={settings.min_devices}")
    resume = run_id is not None and run_id in {r.id for r in store.list_runs()}
    if run_id is None or not resume:
        rid = store.create_run({**cfg.to_dict(), "federated": True}, cfg.days, run_id=run_id)
    elif not store.get_run(run_id).config.get("federated"):
        raise FederatedRunError(f"run {run_id} is a central run; a ServerApp does not take it over")
    else:
        rid = run_id
    owner = take_lease(store, rid, "serverapp")  # LeaseHeldError if a live runner has it
    with store.running(rid, owner):
        FederatedRun(grid, cfg, settings=settings, store=store, run_id=rid, resume=resume,
                     lease_owner=owner,
                     on_day=lambda d, r: _log.info("day %d: I=%s", d, r["I"])).run()
