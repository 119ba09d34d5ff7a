"""Signed bundles: round trip through onnxruntime, and every kind of refusal."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from onnx import TensorProto, helper
from typer.testing import CliRunner

from edge_agent.cli import register as register_edge
from edge_agent.forecast import DeviceState, default_options, rank_options
from mobile_export.bundle import (
    SIGNATURE_DOMAIN,
    build_bundle,
    canonical_json,
    pack,
    read_verified_bundle,
    unpack,
)
from mobile_export.errors import (
    BundleFormatError,
    BundleIntegrityError,
    BundleRollbackError,
    BundleSchemaError,
    BundleSignatureError,
    ForecastInputError,
)
from mobile_export.export import convert_to_ort
from mobile_export.model import PersonalForecast, Theta, example_inputs
from mobile_export.runtime import load_verified_bundle
from protocols.keys import IdentityKey

THETA = Theta(beta=0.42, dt=1.0)


@pytest.fixture(scope="module")
def coordinator_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, coordinator_key) -> Path:
    return build_bundle(THETA, coordinator_key, tmp_path_factory.mktemp("b") / "forecast.lpmb")


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _write(tmp_path: Path, blob: bytes) -> Path:
    path = tmp_path / "bundle.lpmb"
    path.write_bytes(blob)
    return path


def _resign(manifest: dict, model: bytes, key: Ed25519PrivateKey) -> bytes:
    manifest_bytes = canonical_json(manifest)
    return pack(manifest_bytes, key.sign(SIGNATURE_DOMAIN + manifest_bytes), model)


def test_round_trip_matches_torch(bundle: Path, coordinator_key) -> None:
    session = load_verified_bundle(bundle, coordinator_key.public_key())
    assert session.theta == THETA
    manifest = session.manifest
    assert manifest["opset"] <= 21 and manifest["model_format"] == "ort"
    assert manifest["signer"] == _raw(coordinator_key).hex()
    assert bundle.stat().st_size <= 50_000
    inputs = example_inputs(7, 8, 16, seed=5, theta=THETA)
    result = session.run(*[t.numpy() for t in inputs[:5]], uniforms=inputs[6].numpy())
    with torch.no_grad():
        risk, daily, drisk, day = PersonalForecast()(*inputs)
    np.testing.assert_allclose(result.risk, risk.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(result.daily_risk, daily.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(result.drisk_dbeta, drisk.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(result.mc_infection_day, day.numpy().astype(np.int64))
    assert list(result.ranking()) == list(np.argsort(risk.numpy(), kind="stable"))
    # θ override: the coordinator's θ is an input, not baked in
    doubled = session.run(*[t.numpy() for t in inputs[:5]], theta=Theta(beta=0.84, dt=1.0))
    assert np.all(doubled.risk > result.risk)
    assert doubled.mc_risk is None


def test_signed_with_protocols_identity_key(tmp_path: Path) -> None:
    """The coordinator's protocols.keys.IdentityKey signs bundles directly."""
    signer = IdentityKey.generate()
    path = build_bundle(None, signer, tmp_path / "b.lpmb", theta=THETA, model_version="7")
    assert read_verified_bundle(path, signer.public_bytes()).manifest["model_version"] == "7"

    class Liar(IdentityKey):
        def public_bytes(self) -> bytes:
            return _raw(Ed25519PrivateKey.generate())

    liar = Liar.from_private_bytes(IdentityKey.generate().private_bytes())
    with pytest.raises(BundleSignatureError):
        build_bundle(THETA, liar, tmp_path / "liar.lpmb")
    assert not (tmp_path / "liar.lpmb").exists()


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1 :]


def _tampered(blob: bytes) -> dict[str, tuple[bytes, type[Exception]]]:
    manifest_bytes, signature, model = unpack(blob)
    model_start = len(blob) - len(model)
    sig_start = model_start - 4 - len(signature)
    return {
        "model byte": (_flip(blob, model_start + len(model) // 2), BundleIntegrityError),
        "manifest byte": (_flip(blob, 12 + 5), BundleSignatureError),
        "signature byte": (_flip(blob, sig_start + 3), BundleSignatureError),
        "unsigned": (pack(manifest_bytes, b"", model), BundleSignatureError),
        "short signature": (pack(manifest_bytes, signature[:63], model), BundleSignatureError),
        "truncated": (blob[:-1], BundleFormatError),
        "trailing bytes": (blob + b"\x00", BundleFormatError),
        "bad magic": (b"NOTABNDL" + blob[8:], BundleFormatError),
        "empty": (b"", BundleFormatError),
        "huge length": (blob[:8] + b"\xff\xff\xff\xff" + blob[12:], BundleFormatError),
    }


@pytest.mark.parametrize(
    "case",
    [
        "model byte",
        "manifest byte",
        "signature byte",
        "unsigned",
        "short signature",
        "truncated",
        "trailing bytes",
        "bad magic",
        "empty",
        "huge length",
    ],
)
def test_tampered_bundles_are_refused(
    case: str, bundle: Path, coordinator_key, tmp_path: Path
) -> None:
    bad, error = _tampered(bundle.read_bytes())[case]
    with pytest.raises(error):
        load_verified_bundle(_write(tmp_path, bad), coordinator_key.public_key())


def test_wrong_key_and_attacker_resigned(bundle: Path, coordinator_key, tmp_path: Path) -> None:
    attacker = Ed25519PrivateKey.generate()
    with pytest.raises(BundleSignatureError, match="trusted key"):
        load_verified_bundle(bundle, attacker.public_key())
    manifest_bytes, _, model = unpack(bundle.read_bytes())
    manifest = json.loads(manifest_bytes)
    manifest["theta"]["beta"] = 5.0  # a malicious θ, re-signed by the attacker
    forged = _write(tmp_path, _resign(manifest, model, attacker))
    with pytest.raises(BundleSignatureError):
        load_verified_bundle(forged, coordinator_key.public_key())
    assert load_verified_bundle(forged, _raw(attacker)).theta.beta == 5.0  # sanity: it is valid


def test_signed_but_inconsistent_bundles(bundle: Path, coordinator_key, tmp_path: Path) -> None:
    """Even the trusted key cannot make the device load a model its manifest does not pin."""
    trusted = coordinator_key.public_key()
    manifest_bytes, _, model = unpack(bundle.read_bytes())
    manifest = json.loads(manifest_bytes)

    def signed(m: dict, mdl: bytes = model) -> Path:
        return _write(tmp_path, _resign(m, mdl, coordinator_key))

    with pytest.raises(BundleIntegrityError, match="sha256"):
        load_verified_bundle(signed({**manifest, "model_sha256": "00" * 32}), trusted)
    with pytest.raises(BundleIntegrityError, match="bytes"):
        load_verified_bundle(signed({**manifest, "model_size": len(model) + 1}), trusted)
    for bad in (
        {**manifest, "opset": 22},
        {**manifest, "format_version": 2},
        {**manifest, "model_format": "onnx"},
        {**manifest, "theta": {"beta": "0.5", "dt": 1.0}},
        {k: v for k, v in manifest.items() if k != "model_sha256"},
        {**manifest, "state_fields": ["susceptible"]},
    ):
        with pytest.raises(BundleFormatError):
            load_verified_bundle(signed(bad), trusted)
    not_json = b"{not json"
    with pytest.raises(BundleFormatError, match="JSON"):
        path = _write(
            tmp_path, pack(not_json, coordinator_key.sign(SIGNATURE_DOMAIN + not_json), model)
        )
        load_verified_bundle(path, trusted)
    # a different, valid model whose hash the manifest does pin: refused by the schema check
    graph = helper.make_graph(
        [helper.make_node("Identity", ["state"], ["risk"])],
        "other",
        [helper.make_tensor_value_info("state", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("risk", TensorProto.FLOAT, [3])],
    )
    other = convert_to_ort(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()
    )
    onnx.checker.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    swapped = {
        **manifest,
        "model_sha256": hashlib.sha256(other).hexdigest(),
        "model_size": len(other),
    }
    with pytest.raises(BundleSchemaError):
        load_verified_bundle(signed(swapped, other), trusted)
    garbage = b"\x00" * 100  # pinned by hash, but not a model onnxruntime can load
    pinned = {**manifest, "model_sha256": hashlib.sha256(garbage).hexdigest(), "model_size": 100}
    with pytest.raises(BundleSchemaError, match="onnxruntime refused"):
        load_verified_bundle(signed(pinned, garbage), trusted)


def test_bad_queries_are_refused(bundle: Path, coordinator_key) -> None:
    session = load_verified_bundle(bundle, coordinator_key.public_key())
    state, contacts, isolation, mask, prevalence, _, uniforms = (
        t.numpy() for t in example_inputs(7, 4, 3)
    )
    good = dict(
        state=state, contacts=contacts, isolation=isolation, mask=mask, prevalence=prevalence
    )
    bad_cases = [
        {"contacts": contacts[:, :2]},
        {"contacts": -contacts},
        {"isolation": isolation[:3]},
        {"mask": mask + 2},
        {"prevalence": prevalence[:0]},
        {"prevalence": prevalence * np.nan},
        {"state": state[:2]},
        {"state": np.array([1.0, 1.0, -3.0])},
        {"contacts": [["a", "b", "c"]] * 4},
    ]
    for change in bad_cases:
        with pytest.raises(ForecastInputError):
            session.run(**{**good, **change})
    with pytest.raises(ForecastInputError):
        session.run(**good, uniforms=np.ones_like(uniforms))
    with pytest.raises(ForecastInputError):
        session.run(**good, uniforms=uniforms[:, :, :2])
    with pytest.raises(ForecastInputError):
        session.run(**good, theta=Theta(beta=-1.0))


def test_rank_options_and_cli(bundle: Path, coordinator_key, tmp_path: Path) -> None:
    session = load_verified_bundle(bundle, _raw(coordinator_key))
    state = DeviceState(usual_contacts=(3.0, 8.0, 6.0))
    prevalence = np.full((7, 3), 0.03, dtype=np.float32)
    ranked = rank_options(session, state, default_options(state), prevalence, samples=500, seed=1)
    risks = [r.risk for r in ranked]
    assert risks == sorted(risks) and [r.rank for r in ranked] == list(range(1, 9))
    names = [r.option.name for r in ranked]
    assert names[0] == "self-isolate + mask" and names[-1] == "as usual"
    assert all(r.mc_risk is not None and 0 <= r.mc_risk <= 1 for r in ranked)

    app = typer.Typer()
    register_edge(app)
    runner = CliRunner()
    args = ["edge", "forecast", "--bundle", str(bundle), "--prevalence", "0.03,0.03,0.03"]
    ok = runner.invoke(app, [*args, "--trusted-key", _raw(coordinator_key).hex()])
    assert ok.exit_code == 0, ok.output
    lines = [line for line in ok.output.splitlines() if "self-isolate + mask" in line]
    assert lines and lines[0].split("│")[1].strip() == "1"
    other = _raw(Ed25519PrivateKey.generate()).hex()
    wrong = runner.invoke(app, [*args, "--trusted-key", other])
    assert wrong.exit_code == 2 and "BundleSignatureError" in wrong.output


def test_device_side_needs_no_torch() -> None:
    """Verifying and running a bundle imports neither torch nor onnx (a phone has neither)."""
    code = (
        "import sys, edge_agent.forecast, edge_agent.cli, mobile_export.runtime; "
        "bad = {'torch', 'onnx'} & set(sys.modules); assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_rollback_is_refused(tmp_path: Path, coordinator_key) -> None:
    old = build_bundle(
        THETA, coordinator_key, tmp_path / "old.lpmb", created=datetime(2026, 1, 1, tzinfo=UTC)
    )
    new = build_bundle(
        Theta(beta=0.3),
        coordinator_key,
        tmp_path / "new.lpmb",
        created=datetime(2026, 2, 1, tzinfo=UTC),
    )
    accepted = load_verified_bundle(new, coordinator_key.public_key())
    assert accepted.created == datetime(2026, 2, 1, tzinfo=UTC)
    assert load_verified_bundle(new, coordinator_key.public_key(), not_before=accepted.created)
    with pytest.raises(BundleRollbackError):
        load_verified_bundle(old, coordinator_key.public_key(), not_before=accepted.created)


# ---------------------------------------------------------------- issue 14 hardening
PW = "device passphrase 14"


def _two_bundles(tmp_path: Path, key) -> tuple[Path, Path, Path]:
    old = build_bundle(THETA, key, tmp_path / "old.lpmb", created=datetime(2026, 1, 1, tzinfo=UTC))
    new = build_bundle(Theta(beta=0.3), key, tmp_path / "new.lpmb",
                       created=datetime(2026, 2, 1, tzinfo=UTC))
    twin = build_bundle(Theta(beta=0.9), key, tmp_path / "twin.lpmb",
                        created=datetime(2026, 2, 1, tzinfo=UTC))  # same time, other θ
    return old, new, twin


def test_device_path_keeps_anti_rollback_state(tmp_path: Path, coordinator_key) -> None:
    from edge_agent.forecast import forecast_from_bundle
    from edge_agent.store import EdgeStore

    old, new, twin = _two_bundles(tmp_path, coordinator_key)
    pub = coordinator_key.public_key()
    state = DeviceState()
    prev = np.full((7, 3), 0.02, np.float32)
    with EdgeStore(tmp_path / "dev.db", PW) as dev:
        assert forecast_from_bundle(new, pub, state, prev, rollback=dev)
        assert dev.accepted_bundle()["created"].startswith("2026-02-01")
    with EdgeStore(tmp_path / "dev.db", PW) as dev:  # state survives a restart
        with pytest.raises(BundleRollbackError, match="older"):
            forecast_from_bundle(old, pub, state, prev, rollback=dev)
        with pytest.raises(BundleRollbackError, match="different bundle"):
            forecast_from_bundle(twin, pub, state, prev, rollback=dev)
        assert forecast_from_bundle(new, pub, state, prev, rollback=dev)  # same one again: fine


def test_cli_refuses_older_bundle_with_a_store(tmp_path: Path, coordinator_key,
                                               monkeypatch) -> None:
    from mobile_export.cli import register as register_bundle

    old, new, twin = _two_bundles(tmp_path, coordinator_key)
    monkeypatch.setenv("LPM_EDGE_PASSPHRASE", PW)
    app = typer.Typer()
    register_bundle(app)
    register_edge(app)
    runner = CliRunner()
    key = _raw(coordinator_key).hex()
    store = str(tmp_path / "dev.db")
    ok = runner.invoke(app, ["bundle", "verify", "--bundle", str(new), "--trusted-key", key,
                             "--store", store])
    assert ok.exit_code == 0, ok.output
    for cmd in (["bundle", "verify", "--bundle", str(old), "--trusted-key", key],
                ["edge", "forecast", "--bundle", str(old), "--trusted-key", key]):
        refused = runner.invoke(app, [*cmd, "--store", store])
        assert refused.exit_code == 2 and "BundleRollbackError" in refused.output, refused.output
    same_time = runner.invoke(app, ["edge", "forecast", "--bundle", str(twin), "--trusted-key",
                                    key, "--store", store])
    assert same_time.exit_code == 2 and "BundleRollbackError" in same_time.output
    fine = runner.invoke(app, ["edge", "forecast", "--bundle", str(new), "--trusted-key", key,
                               "--store", store])
    assert fine.exit_code == 0, fine.output


def test_naive_not_before_is_a_bundle_error(bundle: Path, coordinator_key) -> None:
    with pytest.raises(BundleRollbackError, match="timezone"):
        read_verified_bundle(bundle, coordinator_key.public_key(), not_before=datetime(2026, 1, 1))


def test_build_never_writes_through_a_planted_symlink(tmp_path: Path, coordinator_key) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "forecast.lpmb"
    (tmp_path / "forecast.lpmb.tmp").symlink_to(victim)
    build_bundle(THETA, coordinator_key, out)
    assert victim.read_text() == "precious"
    assert read_verified_bundle(out, coordinator_key.public_key()).theta == THETA
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "forecast.lpmb", "forecast.lpmb.tmp", "victim.txt"]  # no temporary file left behind


@pytest.mark.parametrize("edit", [
    lambda m: m["theta"].update(beta=float("nan")),
    lambda m: m["theta"].update(beta=float("inf")),
    lambda m: m["theta"].update(beta=-0.5),
    lambda m: m["theta"].update(dt=0.0),
    lambda m: m.update(created="yesterday-ish"),
    lambda m: m.update(created="2026-01-01T00:00:00"),  # no timezone
    lambda m: m.update(isolation_applies=[2.0] * len(m["layers"])),
    lambda m: m.update(default_horizon=-1),
    lambda m: m.update(model_sha256="zz"),
], ids=["nan", "inf", "negative-beta", "zero-dt", "garbage-created", "naive-created",
        "isolation>1", "horizon", "sha"])
def test_signed_but_malformed_manifests_refused(tmp_path: Path, bundle: Path, coordinator_key,
                                                edit) -> None:
    manifest_bytes, _, model = unpack(bundle.read_bytes())
    manifest = json.loads(manifest_bytes)
    edit(manifest)
    mb = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()  # NaN as-is
    blob = pack(mb, coordinator_key.sign(SIGNATURE_DOMAIN + mb), model)
    with pytest.raises(BundleFormatError):
        read_verified_bundle(_write(tmp_path, blob), coordinator_key.public_key())


def test_deeply_nested_manifest_refused(tmp_path: Path, bundle: Path, coordinator_key) -> None:
    _, _, model = unpack(bundle.read_bytes())
    mb = b"[" * 60_000 + b"]" * 60_000
    mb = mb[:60_000]  # within the manifest size limit, far deeper than the parser's stack
    blob = pack(mb, coordinator_key.sign(SIGNATURE_DOMAIN + mb), model)
    with pytest.raises(BundleFormatError):
        read_verified_bundle(_write(tmp_path, blob), coordinator_key.public_key())
