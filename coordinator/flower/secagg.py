"""Multi-round SecAgg+ (protocols.secagg.epoch_server) driven by the coordinator over a
message transport.

:class:`ReportEpoch` is the coordinator's side of one SecAgg+ key epoch over a fixed roster
of devices: keys are agreed once, then each day's reports are summed with masks derived
with the day in their context. :class:`ReportRound` is one day's report aggregation in a
federated run: it continues the previous day's epoch when the day's roster is made of the
epoch's devices (some may be offline: they count as dropped before input and rejoin when
they return), and starts a new epoch (re-keys) otherwise — a new device, too few left for
the threshold, and after a coordinator restart. The coordinator only relays the
state machine's bytes; a device that errors, answers out of protocol or does not answer
counts as dropped at that stage, and the decoded sum covers exactly the survivors.
:func:`run_secagg_round` drives a stand-alone single sum (setup + one day) over a Flower
``Grid`` (tests, benchmarks) with ``edge_agent.secagg_flower:app`` on the devices.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence

import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from protocols.daily import (
    REPORT_FIELDS,
    SECAGG_ATTEMPTS,
    SECAGG_STAGES,
    report_spec_bound,
    secagg_day,
)
from protocols.keys import AgreementKey
from protocols.secagg import (
    InputSpec,
    RoundConfig,
    SecAggAbortError,
    SecAggError,
    default_degree,
    default_threshold,
)
from protocols.secagg.epoch_server import EpochServer, EpochServerStage

__all__ = ["ReportEpoch", "ReportRound", "report_degree", "SecAggRoundResult", "report_spec",
           "run_secagg_round", "wait_for_nodes"]

_TYPE = "query.secagg"


def report_spec() -> InputSpec:
    """Encoding of the daily report vector (floats, 16 fractional bits)."""
    return InputSpec("float", len(REPORT_FIELDS), report_spec_bound(), 16)


#: planning figures for the daily reports' SecAgg+ graph: a device's neighbours are each
#: missing from a day (offline, or dying at a stage) with probability DROPOUT_PLAN, and a day
#: may fail for want of self-mask shares with probability at most FAILURE_PLAN
DROPOUT_PLAN = 0.05
FAILURE_PLAN = 1e-3


def _tail(k: int, at_least: int, p: float) -> float:
    """P[Binomial(k, p) ≥ at_least]."""
    return sum(math.comb(k, j) * p**j * (1 - p) ** (k - j) for j in range(at_least, k + 1))


def report_degree(n: int, dropout: float = DROPOUT_PLAN, failure: float = FAILURE_PLAN) -> int:
    """SecAgg+ neighbours per device for the daily reports: the smallest even degree k ≥
    ``default_degree(n)`` and ≥ 8 for which n · P[more than k − t of a device's k neighbours
    are missing] ≤ ``failure`` when each is missing with probability ``dropout`` (t = the
    default threshold, a strict majority) — the union bound on a day that cannot rebuild
    some survivor's self mask (Bell et al. CCS 2020 size the graph the same way). The
    complete graph below 9 devices. At 5 % and 1e-3: k = 12 at 50 devices, 16 at 1000
    (``default_degree`` alone gives 10 at 1000: a day failed about one time in three).
    A plan the graph cannot meet (a majority of neighbours missing) gives the complete graph;
    ``dropout`` must lie in [0, 0.5): the threshold is a strict majority of the neighbours."""
    if not 0.0 <= dropout < 0.5:
        raise ValueError(f"planned dropout {dropout!r} outside [0, 0.5): SecAgg+ needs a "
                         "strict majority of each device's neighbours to answer")
    if n - 1 <= 8:
        return n - 1
    k = max(default_degree(n), 8)
    while k < n - 1:
        t = default_threshold(k)
        if n * _tail(k, k - t + 1, dropout) <= failure:
            return k
        k += 2
    return n - 1


class ReportEpoch:
    """The coordinator's side of one SecAgg+ key epoch over ``roster`` (device names, in
    order; ``registry`` their Ed25519 identity keys). ``epoch`` numbers it within the run
    (the first report day it serves); ``dropout`` is the planned share of devices missing
    per day that sizes the graph (:func:`report_degree`)."""

    def __init__(self, run_id: str, epoch: int, roster: Sequence[str],
                 registry: Sequence[bytes], spec: InputSpec | None = None,
                 min_survivors: int = 0, dropout: float = DROPOUT_PLAN) -> None:
        self.roster = list(roster)
        self.index = {name: i for i, name in enumerate(self.roster)}
        self.identities = {name: bytes(k) for name, k in zip(self.roster, registry, strict=True)}
        key = AgreementKey.generate()
        n = len(self.roster)
        degree = report_degree(n, dropout)
        # SecAgg+'s security floor: never reveal a sum of fewer than threshold + 1 (and 3)
        floor = max(3, default_threshold(degree) + 1)
        self.config = RoundConfig(run_id, epoch, tuple(self.roster), spec or report_spec(),
                                  os.urandom(32), key.public_bytes(), degree=degree,
                                  min_survivors=min(max(min_survivors, floor), n))
        self.server = EpochServer(self.config, list(registry), key)
        self.confirmed: set[str] = set()  # devices that sent a masked input in this epoch

    def live(self) -> set[str]:
        """Devices that completed the epoch's key setup (empty before)."""
        return {self.roster[i] for i in self.server.live}

    def serves(self, roster: Sequence[str], identities: dict[str, bytes],
               spec: InputSpec, min_survivors: int) -> bool:
        """Whether the next day over ``roster`` can continue this epoch: set up, no day in
        progress, devices of the epoch (each has masked in it) with the same identity keys,
        the same parameters, and every one of them with ≥ t epoch neighbours in ``roster``.
        Devices of the epoch missing from ``roster`` (offline today) count as dropped before
        input: their neighbours reveal only today's day keys with them, so the epoch goes on
        and they rejoin it when they return."""
        floor = max(3, self.config.threshold + 1)
        want = min(max(min_survivors, floor), self.config.n)
        present = {self.index[n] for n in roster if n in self.index}
        return (self.server.stage is EpochServerStage.READY
                and set(roster) <= self.live() and set(roster) <= self.confirmed
                and len(roster) >= want
                and all(len(self.server.neighbours(i) & present) >= self.config.threshold
                        for i in present)
                and all(identities.get(n) == self.identities[n] for n in roster)
                and spec == self.config.spec and want == self.config.min_survivors)


class ReportRound:
    """One day's SecAgg+ aggregation of the reports of the devices named in ``roster``.

    ``epoch`` is the previous day's :attr:`epoch`: it is continued when it
    :meth:`~ReportEpoch.serves` this roster, else a new epoch (numbered ``day``) starts.
    :attr:`new_epoch` says which; :attr:`stages` are the exchanges after the day message
    when nothing aborts (the day reply carries the key advertisement in a new epoch, the
    masked report otherwise); drive the day with :meth:`advance` and :attr:`stage`."""

    def __init__(self, run_id: str, day: int, roster: Sequence[str], registry: Sequence[bytes],
                 spec: InputSpec | None = None, min_survivors: int = 0,
                 epoch: ReportEpoch | None = None, dropout: float = DROPOUT_PLAN) -> None:
        spec = spec or report_spec()
        identities = {n: bytes(k) for n, k in zip(roster, registry, strict=True)}
        self.day = day
        self.new_epoch = epoch is None or not epoch.serves(roster, identities, spec,
                                                           min_survivors)
        if self.new_epoch:
            epoch = ReportEpoch(run_id, day, roster, registry, spec, min_survivors, dropout)
        assert epoch is not None
        self.epoch = epoch
        self.config = epoch.config
        self.roster = epoch.roster  # the epoch's roster order (indices of its messages)
        self.stages: tuple[str, ...] = SECAGG_STAGES if self.new_epoch else SECAGG_STAGES[1:]
        self._setup = self.new_epoch  # key setup still to close (then the day opens)
        self.attempt = 0  # attempts at this day in the epoch (secagg_day(day, attempt))
        self.aborts: list[str] = []  # why earlier attempts aborted (before any reveal)
        #: per re-issued survivor set: the devices left out (no tags, a neighbour outside S)
        self.left_out: list[list[str]] = []
        self._reissued = False  # the current attempt's survivor set was re-issued
        self._resigning = False  # the open exchange is the re-issued set's consistency
        self.stage: str | None = None  # the exchange the last advance() opened
        if not self.new_epoch:
            epoch.server.open_day(secagg_day(day))
        self.rejected: dict[str, str] = {}

    @property
    def server(self) -> EpochServer:
        return self.epoch.server

    def registry_for(self, name: str) -> list[int]:
        """Roster indices whose identity keys ``name`` needs: itself and its neighbours."""
        i = self.epoch.index[name]
        return [i, *sorted(self.server.neighbours(i))]

    def receive(self, name: str, blob: bytes) -> None:
        """Feed one device's message for the current stage; a rejected one drops it."""
        try:
            self.server.receive(self.epoch.index[name], bytes(blob))
        except (SecAggError, KeyError) as exc:
            self.rejected[name] = f"{type(exc).__name__}: {exc}"
            return
        if self.server.stage is EpochServerStage.INPUT:
            self.epoch.confirmed.add(name)  # it holds the epoch's keys (roster accepted)

    @property
    def exchange_tag(self) -> str:
        """A name for the open exchange, unique within the day (message group ids)."""
        tag = f"{self.stage}-{self.attempt}" if self.attempt else str(self.stage)
        return tag + "-reissued" if self._resigning else tag

    @property
    def pday(self) -> int:
        """The SecAgg+ protocol day of the current attempt."""
        return secagg_day(self.day, self.attempt)

    def advance(self) -> dict[str, bytes]:
        """Close the stage; ``{device name: bytes}`` for the next exchange, whose name is
        then :attr:`stage` (``None`` once the day is decoded). Closing a new epoch's key
        setup opens the day. A day that aborts before anything is revealed is attempted
        again in the same epoch while attempts remain (``masked_input`` with the attempt
        number as payload, to the devices that tagged the aborted attempt's survivor set);
        otherwise SecAggAbortError. Before that, closing the consistency round re-issues
        the survivor set once per attempt without the devices that sent no tags while a
        neighbour of theirs is outside it (they dropped after masking: their input is left
        out exactly) — stage ``consistency`` again, to the devices still in the set."""
        srv = self.server
        before, tagged = srv.stage, srv.tagged
        self._resigning = False
        try:
            if before is EpochServerStage.CONSISTENCY and not self._reissued:
                self._reissued = True
                s_before = srv.survivor_set
                out = srv.reissue_survivors()
                if out:
                    self._resigning = True
                    self.left_out.append(sorted(self.roster[i] for i in s_before
                                                if i not in out))
                    self.stage = "consistency"
                    return {self.roster[i]: b for i, b in out.items()}
            out = srv.advance()
        except SecAggAbortError as exc:
            if before is not EpochServerStage.CONSISTENCY \
                    or self.attempt + 1 >= SECAGG_ATTEMPTS:
                raise
            # nothing of this attempt was revealed (the server aborted before sending any
            # unmask request): the devices that tagged mask the day again under fresh day
            # keys; the ones that did not are out of the day (dropped before the new input)
            self.aborts.append(str(exc))
            self.attempt += 1
            self._reissued = False
            srv.open_day(self.pday)
            self.stage = "masked_input"
            return {self.roster[i]: bytes([self.attempt]) for i in sorted(tagged)}
        if self._setup:  # setup closed: rosters go out, the masked reports come back
            self._setup = False
            srv.open_day(self.pday)
        self.stage = {EpochServerStage.INPUT: "masked_input",
                      EpochServerStage.CONSISTENCY: "consistency",
                      EpochServerStage.UNMASK: "unmask"}.get(srv.stage)
        return {self.roster[i]: b for i, b in out.items()}

    def total(self) -> torch.Tensor:
        return self.server.decoded(self.pday)

    def survivors(self) -> list[str]:
        return [self.roster[i] for i in sorted(self.server.survivors[self.pday])]


class SecAggRoundResult:
    """Decoded sum, the node ids in it, the roster order and each node's reported
    partition id (simulation engine; −1 elsewhere)."""

    def __init__(self, total: torch.Tensor, survivors: list[int], nodes: list[int],
                 partition_ids: dict[int, int]) -> None:
        self.total, self.survivors, self.nodes = total, survivors, nodes
        self.partition_ids = partition_ids


def wait_for_nodes(grid: Grid, n: int, wait: float = 120.0) -> list[int]:
    """The first ``n`` connected node ids (fewer if ``wait`` seconds pass)."""
    deadline = time.time() + wait
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.time() > deadline:
            return nodes[:n]
        time.sleep(0.5)


def _exchange(grid: Grid, contents: dict[int, ConfigRecord], timeout: float,
              group: str) -> dict[int, ConfigRecord]:
    from flwr.app import RecordDict

    msgs = [Message(RecordDict({"cfg": c}), dst_node_id=n, message_type=_TYPE, group_id=group)
            for n, c in contents.items()]
    out: dict[int, ConfigRecord] = {}
    for r in grid.send_and_receive(msgs, timeout=timeout):
        if not r.has_error():
            out[r.metadata.src_node_id] = r.content.config_records["cfg"]
    return out


def run_secagg_round(
    grid: Grid,
    nodes: Iterable[int],
    spec: InputSpec,
    *,
    run_id: str = "secagg",
    round_: int = 0,
    silent: dict[str, set[int]] | None = None,
    timeout: float = 120.0,
    **round_kw: int,
) -> SecAggRoundResult:
    """One SecAgg+ sum over ``nodes`` (key setup + one day, epoch = day = ``round_``; each
    device sums its own demo input); ``silent`` (tests) lists node ids not contacted at a
    stage (advertise, masked_input, consistency, unmask), as if they had dropped."""
    nodes = sorted(nodes)
    silent = silent or {}
    replies = _exchange(grid, {n: ConfigRecord({"stage": "enrol"}) for n in nodes}, timeout,
                        f"{run_id}/{round_}/enrol")
    nodes = [n for n in nodes if n in replies]
    registry = [bytes(replies[n]["identity"]) for n in nodes]  # type: ignore[arg-type]
    key = AgreementKey.generate()
    cfg = RoundConfig(run_id, round_, tuple(str(n) for n in nodes), spec, os.urandom(32),
                      key.public_bytes(), **round_kw)
    server = EpochServer(cfg, registry, key)
    index = {n: i for i, n in enumerate(nodes)}
    cfg_bytes = cfg.to_bytes()
    gone: set[int] = set()

    def stage(name: str, contents: dict[int, ConfigRecord]) -> None:
        gone.update(silent.get(name, set()))
        live = {n: c for n, c in contents.items() if n not in gone}
        for n, r in _exchange(grid, live, timeout, f"{run_id}/{round_}/{name}").items():
            try:
                server.receive(index[n], bytes(r["payload"]))  # type: ignore[arg-type]
            except SecAggError:
                gone.add(n)  # rejected: treated as a dropout

    stage("advertise", {n: ConfigRecord({"stage": "advertise", "config": cfg_bytes,
                                         "registry": registry, "index": index[n]})
                        for n in nodes})
    for name in SECAGG_STAGES:
        out = server.advance()
        if name == "masked_input":
            server.open_day(secagg_day(round_))
        stage(name, {nodes[i]: ConfigRecord({"stage": name, "payload": b, "day": round_})
                     for i, b in out.items()})
    server.advance()
    pids = {n: int(replies[n].get("partition_id", -1)) for n in nodes}  # type: ignore[arg-type]
    pday = secagg_day(round_)
    return SecAggRoundResult(server.decoded(pday),
                             [nodes[i] for i in sorted(server.survivors[pday])], nodes, pids)
