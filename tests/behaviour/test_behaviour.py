"""Behaviour archetypes: grouping, rule backend, LLM backend against a real local server, policy."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from coordinator.llm_backend import LLMBackend
from simulation.behaviour import (
    ArchetypeSpec,
    BehaviourBackendError,
    RuleBasedBackend,
    Situation,
    add_archetype_behaviour,
    assign_archetypes,
)
from simulation.behaviour.scenario import run_stimulus_comparison
from simulation.engine import simulate
from simulation.models import SEIRM
from simulation.population import synthesize


class _FakeOpenAI(BaseHTTPRequestHandler):
    """OpenAI-compatible /v1/chat/completions: 'yes' when prevalence ≥ 1 %, with scripted faults."""

    fail_next = 0
    calls = 0
    reply = None

    def do_POST(self):  # noqa: N802
        cls = type(self)
        cls.calls += 1
        if self.path != "/v1/chat/completions":
            self.send_response(404)
            self.end_headers()
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if cls.fail_next > 0:
            cls.fail_next -= 1
            self.send_response(503)
            self.end_headers()
            return
        prompt = body["messages"][-1]["content"]
        prevalence = float(prompt.split("local prevalence ")[1].split("%")[0])
        answer = cls.reply or ("yes" if prevalence >= 1.0 else "no")
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_llm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    _FakeOpenAI.fail_next, _FakeOpenAI.calls, _FakeOpenAI.reply = 0, 0, None
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _situation(prev=0.02, status=0, income=0, occupation=2, stimulus=0.0, fatigue=0.0):
    return Situation({"age_band": 3, "income": income, "occupation": occupation, "status": status},
                     10, prev, fatigue, stimulus)


def test_archetypes_cover_static_and_dynamic_attributes():
    pop = synthesize("tiny", seed=0)
    model = SEIRM()
    state = model.initial_state(pop.n, torch.Generator().manual_seed(0), torch.device("cpu"))
    spec = ArchetypeSpec()
    ids = assign_archetypes(spec, pop.attributes, state)
    assert ids.min() >= 0 and ids.max() < spec.count == 324
    i = int(torch.nonzero(state["I"] > 0)[0])
    assert spec.decode(int(ids[i]))["status"] == 2
    state["I"][i], state["R"][i] = 0.0, 1.0  # the agent recovers: it changes archetype
    assert spec.decode(int(assign_archetypes(spec, pop.attributes, state)[i]))["status"] == 3
    assert spec.decode(int(ids[i]))["age_band"] == int(pop.attributes["age_band"][i])


def test_rule_backend_directions():
    b = RuleBasedBackend()
    mean = lambda s: sum(b.query(s, "isolate", 5)) / 5  # noqa: E731
    assert mean(_situation(prev=0.05)) > mean(_situation(prev=0.001))
    assert mean(_situation(fatigue=1.0)) < mean(_situation(fatigue=0.0))
    assert mean(_situation(stimulus=500)) > mean(_situation(stimulus=0))
    assert mean(_situation(income=2)) > mean(_situation(income=0))
    with pytest.raises(BehaviourBackendError):
        b.query(_situation(), "dance", 3)


def test_llm_backend_against_local_server_caches_and_retries(fake_llm):
    llm = LLMBackend(fake_llm, retries=2, backoff=0.01, timeout=5)
    assert llm.query(_situation(prev=0.02), "isolate", 4) == [1.0] * 4
    assert llm.query(_situation(prev=0.001), "isolate", 4) == [0.0] * 4
    calls = _FakeOpenAI.calls
    llm.query(_situation(prev=0.02), "isolate", 4)  # cached
    assert _FakeOpenAI.calls == calls
    _FakeOpenAI.fail_next = 2  # two 503s, then success
    assert llm.query(_situation(prev=0.03), "mask", 1) == [1.0]
    _FakeOpenAI.fail_next = 10
    with pytest.raises(BehaviourBackendError, match="failed after 3 tries"):
        llm.query(_situation(prev=0.04), "mask", 1)
    _FakeOpenAI.fail_next, _FakeOpenAI.reply = 0, "maybe"
    with pytest.raises(BehaviourBackendError, match="yes or no"):
        llm.query(_situation(prev=0.05), "test", 1)
    llm.close()


def test_llm_backend_unreachable_endpoint_is_a_clear_error():
    with LLMBackend("http://127.0.0.1:9", retries=0, timeout=1) as llm, pytest.raises(BehaviourBackendError):
        llm.query(_situation(), "isolate", 1)


def test_llm_backend_drives_the_simulation(fake_llm):
    pop = synthesize("tiny", seed=1)
    model = SEIRM(beta=0.8)
    llm = LLMBackend(fake_llm, backoff=0.01)
    policy = add_archetype_behaviour(model, backend=llm, samples=2)
    tr = simulate(model, pop, 8, seed=1)
    assert len(policy.queries_per_day) == 8
    assert all(q % (3 * 2) == 0 for q in policy.queries_per_day)  # K_present × A × M
    assert set(policy.last_probabilities.unique().tolist()) <= {0.0, 1.0}  # yes/no answers
    assert _FakeOpenAI.calls <= sum(policy.queries_per_day)  # cache: never more calls than queries
    llm.close()
    assert torch.all(sum(tr[c] for c in ("S", "E", "I", "R", "M")) == pop.n)


def test_stimulus_reduces_infections():
    pop = synthesize("nyc", seed=0, scale=0.002)
    cmp = run_stimulus_comparison(pop, 45, 500, seed=0)
    assert cmp.stimulus.total_infections < cmp.baseline.total_infections
    assert cmp.queries_per_day > 0
    base = SEIRM(beta=0.6)
    with torch.no_grad():
        none = simulate(base, pop, 45, seed=0)
    assert cmp.baseline.total_infections < none.total_infections  # behaviour reduces spread


class _Never:
    """A backend whose archetypes never act."""

    def query(self, situation, action, m):
        return [0.0] * m


def test_inactive_behaviour_leaves_seirm_unchanged_and_counts_kam():
    pop = synthesize("tiny", seed=2)
    with torch.no_grad():
        plain = simulate(SEIRM(beta=0.8), pop, 10, seed=3)
        model = SEIRM(beta=0.8)
        policy = add_archetype_behaviour(model, backend=_Never(), samples=3)
        quiet = simulate(model, pop, 10, seed=3)
    for c in ("S", "E", "I", "R", "M", "new_infections"):
        assert torch.equal(plain[c], quiet[c]), c
    spec = policy.spec
    state = SEIRM(beta=0.8).initial_state(pop.n, torch.Generator().manual_seed(3), torch.device("cpu"))
    present = int(torch.unique(assign_archetypes(spec, pop.attributes, state)).numel())
    assert policy.queries_per_day[0] == present * 3 * 3  # K × A × M on day 0


def test_bad_settings_are_rejected():
    from simulation.behaviour import ArchetypePolicy

    with pytest.raises(ValueError):
        ArchetypePolicy(samples=0)
    with pytest.raises(ValueError):
        ArchetypePolicy(stimulus=-1)


def test_rule_batch_matches_single_queries():
    b = RuleBasedBackend()
    sits = [_situation(prev=p, status=st, income=inc, stimulus=s)
            for p, st, inc, s in ((0.01, 0, 0, 0), (0.05, 2, 1, 500), (0.0, 3, 2, 1000))]
    batch = b.query_batch(sits, 4)
    assert batch.shape == (3, 3, 4)
    for i, s in enumerate(sits):
        for a, action in enumerate(("isolate", "mask", "test")):
            assert batch[i, a].tolist() == pytest.approx(b.query(s, action, 4), rel=1e-12)


def test_conditional_draws_are_independent_bernoullis():
    from simulation.behaviour.policy import conditional_draws

    n = 400_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(5))
    p = torch.tensor([0.3, 0.6, 0.05])[:, None].expand(3, n)
    iso, mask, test = conditional_draws(p, u)
    se = 4 * (0.25 / n) ** 0.5
    for draw, pa in ((iso, 0.3), (mask, 0.6), (test, 0.05)):
        assert abs(draw.mean().item() - pa) < se
    assert abs((iso * mask).mean().item() - 0.18) < se  # independence, not comonotone
    assert abs((mask * test).mean().item() - 0.03) < se


def test_fused_kernel_equals_torch_path():
    pop = synthesize("nyc", seed=0, scale=0.002)
    runs = {}
    for fused in (True, False):
        model = SEIRM(beta=0.7)
        pol = add_archetype_behaviour(model, fused=fused, stimulus=300)
        with torch.no_grad():
            runs[fused] = (simulate(model, pop, 20, seed=4), pol)
    (a, pa), (b, pb) = runs[True], runs[False]
    assert pa.queries_per_day == pb.queries_per_day
    assert torch.equal(a.final_state["behaviour"], b.final_state["behaviour"])
    assert torch.equal(a["new_infections"], b["new_infections"])
    assert a.final_state["behaviour"].gt(0).any()


@pytest.mark.parametrize("estimator", ["straight_through", "expected"])
def test_gradients_flow_through_seirm_with_behaviour(estimator):
    pop = synthesize("tiny", seed=0)
    model = SEIRM(beta=0.8)
    policy = add_archetype_behaviour(model, stimulus=200)
    tr = simulate(model, pop, 6, seed=0, estimator=estimator)
    tr.total_infections.backward()
    assert torch.isfinite(model.beta.grad) and model.beta.grad != 0
    assert len(policy.queries_per_day) == 6


def test_fused_and_torch_paths_give_the_same_gradient():
    pop = synthesize("tiny", seed=3)
    grads = []
    for fused in (True, False):
        model = SEIRM(beta=0.9)
        add_archetype_behaviour(model, fused=fused)
        tr = simulate(model, pop, 8, seed=2)
        (tr.total_infections + tr.final_state["tested_positive"].sum()).backward()
        grads.append(model.beta.grad.item())
    assert grads[0] == pytest.approx(grads[1], rel=1e-5)


class _Tests:
    """A backend whose archetypes only ever take the test action (probability ``p``)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def query(self, situation, action, m):
        return [self.p if action == "test" else 0.0] * m


@pytest.mark.parametrize("fused", [True, False])
def test_test_action_reaches_isolation(fused):
    """Voluntary tests feed the same day's isolation: everyone testing cuts infections
    (before the fix Testing overwrote them first and both runs were identical)."""
    pop = synthesize("tiny", seed=4)
    totals = []
    for p in (0.0, 1.0):
        model = SEIRM(beta=0.9, test_rate=0.0)
        add_archetype_behaviour(model, backend=_Tests(p), samples=1, fused=fused)
        assert list(model.substeps).index("behaviour") < list(model.substeps).index("isolation")
        with torch.no_grad():
            tr = simulate(model, pop, 30, seed=5)
        totals.append(float(tr.total_infections))
    assert totals[1] < 0.8 * totals[0], totals
