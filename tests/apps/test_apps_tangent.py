"""Exact decentralised gradients in the Flower deployment: every device (a real ClientApp in
a device-host process) carries ∂state/∂β, the secure neighbourhood sum carries its
neighbours' tangents in a second round, its SecAgg+'d report carries ∂new_i/∂β; the
coordinator adds the synthetic agents' tangents. The federated per-day Σ ∂new_i/∂β equals
central autograd of the same model and the fleet-mode (simulated devices) value."""

from __future__ import annotations

import pytest
import torch

from coordinator.fleet import ProcessTransport
from coordinator.flower.server_app import FederatedRun, FederatedSettings
from coordinator.hybrid import HybridSimulation
from coordinator.runner import RunConfig, physical_agents
from simulation.engine import simulate
from simulation.models import SIR
from simulation.population import synthesize


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    torch.set_num_threads(1)


def _central(cfg: RunConfig, estimator: str) -> torch.Tensor:
    pop = synthesize(cfg.population, seed=cfg.seed, scale=cfg.scale)
    model = SIR(cfg.beta, cfg.gamma, cfg.initial_infected)
    new = simulate(model, pop, cfg.days, cfg.seed, estimator=estimator)["new_infections"][1:]
    return torch.tensor([float(torch.autograd.grad(new[t], model.beta, retain_graph=True)[0])
                         for t in range(cfg.days)], dtype=torch.float64)


def _fleet_mode(cfg: RunConfig, estimator: str) -> torch.Tensor:
    pop = synthesize(cfg.population, seed=cfg.seed, scale=cfg.scale)
    sim = HybridSimulation(SIR(cfg.beta, cfg.gamma, cfg.initial_infected), pop,
                           physical_agents(pop.n, cfg.devices), cfg.seed, estimator=estimator,
                           tangents=True, frac_bits=40)
    return torch.tensor([float(sim.step()["d_new_dbeta"]) for _ in range(cfg.days)],
                        dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp(min=1e-12)).max())


@pytest.mark.parametrize("estimator", ["expected",
                                       pytest.param("straight_through", marks=pytest.mark.slow)])
def test_flower_devices_carry_tangents_exact_gradient(estimator):
    cfg = RunConfig(population="tiny", days=6, seed=3, devices=50, initial_infected=0.05,
                    beta=0.6)
    central = _central(cfg, estimator)
    fleet = _fleet_mode(cfg, estimator)
    t = ProcessTransport(cfg.devices)
    try:
        run = FederatedRun(t, cfg, settings=FederatedSettings(
            shared_seed=True, tangents=True, estimator=estimator))
        rows = run.run()
    finally:
        t.close()
    fed = torch.tensor([float(r["d_new_dbeta"]) for r in rows], dtype=torch.float64)
    phys = torch.tensor([float(r["d_new_dbeta_physical"]) for r in rows])
    one_step = torch.tensor([float(r["physical_dp_dbeta"]) for r in rows])
    print("central", central.tolist(), "\nfed", fed.tolist(), "\nfleet", fleet.tolist(),
          "\nrel fed/central", _rel(fed, central), "rel fed/fleet", _rel(fed, fleet),
          "\nphys", phys.tolist(), "\none-step phys", one_step.tolist())
    assert len(rows) == cfg.days and all(r["survivors"] == cfg.devices for r in rows)
    assert _rel(fed, central) < 1e-5
    assert _rel(fed, fleet) < 1e-5
    assert all(float(p) != 0.0 for p in phys[1:])  # the devices' tangents are in it
    # the devices' Eq. 11 one-step sum (neighbours held fixed) is not the full-path one
    assert float(((one_step[1:] - phys[1:]).abs() / phys[1:].abs()).min()) > 0.1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tangents_over_real_superlink_and_supernodes(tmp_path, e2e):
    """The same over real processes: flower-superlink + 3 flower-supernode + `flwr run` with
    run config ``tangents=true``; the committed rows' d_new_dbeta equal central autograd."""
    import shutil
    import subprocess
    import time

    from coordinator.store import CoordinatorStore

    root, bin_ = e2e.root, e2e.bin
    if shutil.which("flower-superlink", path=str(bin_)) is None:
        pytest.skip("flower-superlink not installed")
    link, *capio = e2e.ports(4)
    env = e2e.flower_env(tmp_path, link, OMP_NUM_THREADS="1")

    def spawn(args: list[str], log: str) -> subprocess.Popen:
        return e2e.spawn(args, env, tmp_path / log)

    db = tmp_path / "coord.db"
    procs = [spawn([str(bin_ / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                    "--port", str(link), "--disable-runtime-dependency-installation",
                    "--database", str(tmp_path / "link.db")], "superlink.log")]
    cfg = RunConfig(population="tiny", days=3, seed=4, devices=3, initial_infected=0.05,
                    beta=0.5)
    try:
        time.sleep(3)
        for k in range(3):
            procs.append(spawn([str(bin_ / "flower-supernode"), "--insecure", "--superlink",
                                f"127.0.0.1:{link}", "--host", "127.0.0.1", "--port",
                                str(capio[k])], f"supernode{k}.log"))
        out = subprocess.run(
            [str(bin_ / "flwr"), "run", ".", "e2e", "--stream", "--run-config",
             f"num-days={cfg.days} devices=3 seed={cfg.seed} initial-infected=0.05 "
             f"db='{db}' run-id='tan' min-devices=3 shared-seed=true tangents=true "
             "estimator='expected'"],
            env=env, cwd=root, capture_output=True, text=True, timeout=480)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        deadline = time.time() + 120
        store = CoordinatorStore(db)
        while len(store.series("tan")) < cfg.days:
            assert time.time() < deadline, out.stdout[-3000:]
            time.sleep(1)
        series = store.series("tan")
    finally:
        e2e.stop(procs)
    fed = torch.tensor([float(r["d_new_dbeta"]) for r in series], dtype=torch.float64)
    assert _rel(fed, _central(cfg, "expected")) < 1e-5
    assert _rel(fed, _fleet_mode(cfg, "expected")) < 1e-5
    assert all(float(r["d_new_dbeta_physical"]) != 0.0 for r in series[1:])


def test_signed_tangent_round_leaves_a_dropped_contact_out():
    """The tangent round's agents take signed contributions in [−B, B] (``value_bound``): a
    contact that drops out is left out of the sum exactly, as for values (the old shifted
    encoding (t + B)/(2B), decoded with the full public weight sum, was off by B·w_dropped);
    a contribution past B is refused."""
    from protocols.daily import TANGENT_BOUND, tangent_round
    from protocols.neighbourhood import (
        AssistedNeighbourhoodAgent,
        NeighbourhoodError,
        NeighbourhoodRelay,
    )
    from protocols.ring import FixedPointRing

    contacts = [f"a{k}" for k in range(1, 7)]
    relay = NeighbourhoodRelay({"a0": contacts}, variant="assisted", run_id="r")
    ring = FixedPointRing(40)
    agents = {n: AssistedNeighbourhoodAgent(n, "r", ring=ring, value_bound=TANGENT_BOUND)
              for n in ["a0", *contacts]}
    for n, a in agents.items():
        relay.register(n, a.keyring.public_bytes())
    attempt = relay.begin_round(tangent_round(3), set(agents))
    tangents = {n: (-1) ** k * 3.25 * k for k, n in enumerate(contacts, 1)}
    w = {n: 0.5 + 0.1 * k for k, n in enumerate(contacts)}
    uploads = {}
    for n, a in agents.items():
        a.keyring.add_peers(relay.keys_for(attempt.plans[n]))
        uploads[n] = a.start(attempt.plans[n], tangents.get(n, 0.0),
                             weights={"a0": w[n]} if n in w else {"a1": 1.0},
                             weight_sum=sum(w.values()) if n == "a0" else None)
    dropped = "a4"
    del uploads[dropped]
    dl = attempt.route_phase1(uploads)["a0"]
    res = agents["a0"].on_masked(dl.envelopes, dl.mask_sum)
    assert res is not None
    exact = sum(w[n] * tangents[n] for n in contacts if n != dropped)
    assert res.value == pytest.approx(exact, abs=1e-9)
    with pytest.raises(NeighbourhoodError, match="contribution must be in"):
        AssistedNeighbourhoodAgent("a9", "r", value_bound=TANGENT_BOUND).start(
            attempt.plans["a1"], TANGENT_BOUND * 1.01, weights={"a0": 1.0})
