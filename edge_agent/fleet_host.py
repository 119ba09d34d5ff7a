"""Device host of a simulated fleet: many edge-agent ClientApps in one process of their own.

``python -m edge_agent.fleet_host`` reads length-prefixed pickled frames on stdin and answers
on stdout. Each simulated device is the real :data:`edge_agent.client_app.app` with its own
Flower ``Context`` (node state); messages are real Flower ``Message`` objects built from the
:mod:`protocols.daily` dicts. The coordinator process (``coordinator.fleet``) never holds a
device's state: it only sees the replies, as over a SuperLink.

Frames: ``("init", {"nodes": [...], "offline": {node: [day, stage, back_day]},
"node_configs": {node: {...}}})`` (e.g. ``lpm-store`` for a device with its own store),
``("exchange", (message_type, {node: dict}, group))`` -> ``(replies, failures)``,
``("states", None)`` -> each device's true S, I, R (the test harness's view of what the
devices' stores hold; the coordinator never asks), ``("close", None)``. ``offline`` simulates dropouts: a node stops answering from ``stage``
of ``day`` (stages: :data:`protocols.daily.EXCHANGES` — day, masked_input, consistency,
unmask) until ``back_day``.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import time
import traceback
from typing import Any, BinaryIO, cast

from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from protocols.daily import EXCHANGES, Keys, MessageType

__all__ = ["main", "read_frame", "write_frame", "STAGE_RANK"]

STAGE_RANK = {"enrol": -1, **{name: rank for rank, name in enumerate(EXCHANGES)}}
#: this host's shard of the fleet (``coordinator.fleet`` starts one host per block of nodes)
_SHARD = int(os.environ.get("LPM_FLEET_SHARD", "0") or 0)


def read_frame(f: BinaryIO) -> Any:
    head = f.read(8)
    if len(head) < 8:
        raise EOFError
    (size,) = struct.unpack("<Q", head)
    return pickle.loads(f.read(size))


def write_frame(f: BinaryIO, obj: Any) -> None:
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(blob)) + blob)
    f.flush()


class _Host:
    def __init__(self, nodes: list[int], offline: dict[int, list[int | str]],
                 node_config: dict[str, Any],
                 node_configs: dict[int, dict[str, Any]] | None = None) -> None:
        from edge_agent.client_app import app

        self.app = app
        per = node_configs or {}
        self.contexts = {n: Context(run_id=1, node_id=n,
                                    node_config={**node_config, **per.get(n, {})},
                                    state=RecordDict(), run_config={}) for n in nodes}
        self.offline = offline
        self.counter = 0

    def _is_offline(self, node: int, message_type: str, body: dict[str, Any]) -> bool:
        sched = self.offline.get(node)
        if sched is None:
            return False
        off_day, off_stage, back = int(sched[0]), str(sched[1]), int(sched[2])
        if message_type == MessageType.DAY:
            day, stage = int(body["day"]), "day"
        elif message_type == MessageType.STAGE:
            day, stage = int(body["day"]) + 1, str(body["stage"])
        else:
            return False
        started = day > off_day or (day == off_day and STAGE_RANK[stage] >= STAGE_RANK[off_stage])
        return started and day < back

    def states(self) -> dict[int, dict[str, object]]:
        """Each enrolled device's own agent id, day, S, I and R (what its store would hold)."""
        out: dict[int, dict[str, object]] = {}
        for node, ctx in self.contexts.items():
            st = ctx.state.config_records.get(Keys.DEVICE_STATE)
            if st is not None:
                out[node] = {"agent_id": str(st["agent_id"]), "day": int(cast(int, st["day"])),
                             **{c: float(cast(float, st[c])) for c in ("S", "I", "R")}}
        return out

    def exchange(self, message_type: str, contents: dict[int, dict[str, Any]], group: str
                 ) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
        replies: dict[int, dict[str, Any]] = {}
        failures: dict[int, str] = {}
        for node, body in contents.items():
            if node not in self.contexts:
                failures[node] = "unknown node"
                continue
            if self._is_offline(node, message_type, body):
                failures[node] = "offline"
                continue
            self.counter += 1
            meta = Metadata(run_id=1, message_id=f"m{_SHARD}-{self.counter}", src_node_id=0,
                            dst_node_id=node, reply_to_message_id="", group_id=group,
                            created_at=time.time(), ttl=3600.0, message_type=message_type)
            # the SuperNode's own form (content + full metadata), outside Message's public overloads
            msg = cast(Any, Message)(RecordDict({Keys.RECORD: ConfigRecord(body)}), metadata=meta)
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as exc:  # a failing device is that device's dropout
                failures[node] = f"{type(exc).__name__}: {exc}"
                if os.environ.get("LPM_FLEET_DEBUG"):
                    traceback.print_exc(file=sys.stderr)
                continue
            if reply.has_error():
                failures[node] = str(reply.error.reason)
            else:
                replies[node] = dict(reply.content.config_records[Keys.RECORD])
        return replies, failures


def main() -> None:
    """Serve frames until ``close`` or end of input (``LPM_FLEET_PROFILE=path``: cProfile)."""
    prof_path = os.environ.get("LPM_FLEET_PROFILE")
    if prof_path:
        prof_path = f"{prof_path}.{_SHARD}" if _SHARD else prof_path
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            _serve()
        finally:
            prof.disable()
            prof.dump_stats(prof_path)
        return
    _serve()


def _serve() -> None:
    import torch

    import edge_agent.client_app  # noqa: F401  (the devices' stack, imported before ``init``
    # arrives: a coordinator that starts this host early overlaps it with its own start-up)

    torch.set_num_threads(1)
    fin, fout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # keep stray prints off the frame channel
    host: _Host | None = None
    while True:
        try:
            op, arg = read_frame(fin)
        except EOFError:
            return
        if op == "init":
            host = _Host(list(arg["nodes"]), dict(arg.get("offline", {})),
                         dict(arg.get("node_config", {})), dict(arg.get("node_configs", {})))
            write_frame(fout, ("ok", None))
        elif op == "exchange":
            if host is None:
                write_frame(fout, ("error", "not initialised"))
                continue
            write_frame(fout, ("ok", host.exchange(*arg)))
        elif op == "states":  # the harness reads simulated devices' true states (tests)
            if host is None:
                write_frame(fout, ("error", "not initialised"))
                continue
            write_frame(fout, ("ok", host.states()))
        elif op == "close":
            write_frame(fout, ("ok", None))
            return
        else:
            write_frame(fout, ("error", f"unknown op {op!r}"))


if __name__ == "__main__":
    main()
