"""Real processes on 127.0.0.1 over TLS with SuperNode authentication: a CA and a SuperLink
certificate made here with `cryptography`, `flower-superlink --enable-supernode-auth`, three
devices registered with `flwr supernode register` and started with `lpm edge run
--root-certificates … --auth-supernode-private-key …`, one device with an unregistered key refused (exit non-zero), then
`flwr run` over TLS; the series equals the centralised run and every device kept its
private keys encrypted in its own `EdgeStore`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificates(d: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a SuperLink certificate for 127.0.0.1/localhost signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lpm-e2e CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = d / "ca.crt", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem_key(key))
    return paths


def _node_keys(d: Path, name: str) -> tuple[Path, Path]:
    """A P-384 SuperNode key pair in OpenSSH format (what flwr 1.41 reads)."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = d / name, d / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return priv, pub


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tls_supernode_auth_flwr_run(tmp_path, e2e):
    ROOT, BIN = e2e.root, e2e.bin
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        pytest.skip("flower-superlink not installed")
    ca, cert, key = _certificates(tmp_path)
    link, *capio = e2e.ports(5)
    env = e2e.flower_env(tmp_path, link, name="tls", ca=ca)
    db = tmp_path / "coord.db"
    procs = [e2e.spawn([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(ca),
                     "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                     "--enable-supernode-auth",
                     "--host", "127.0.0.1", "--port", str(link),
                     "--disable-runtime-dependency-installation",
                     "--database", str(tmp_path / "link.db")], env, tmp_path / "superlink.log")]
    try:
        time.sleep(4)
        keys = [_node_keys(tmp_path, f"node{k}") for k in range(4)]
        for _, pub in keys[:3]:  # the fourth key is never registered
            out = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(pub), "tls"],
                                 env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stdout + out.stderr
        stores = [tmp_path / f"device{k}.db" for k in range(4)]
        dev_env = {**env, "LPM_EDGE_PASSPHRASE": "device passphrase e2e"}
        for k, (priv, _) in enumerate(keys):
            procs.append(e2e.spawn([str(BIN / "lpm"), "edge", "run", "--superlink",
                                 f"127.0.0.1:{link}", "--root-certificates", str(ca),
                                 "--port", str(capio[k]), "--auth-private-key", str(priv),
                                 "--store", str(stores[k])], dev_env, tmp_path / f"edge{k}.log"))
        out = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "tls", "--stream", "--run-config",
             f"num-days=2 devices=3 seed=4 initial-infected=0.05 db='{db}' run-id='tls' "
             "min-devices=3 shared-seed=true"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=480)
        (tmp_path / "flwr-run.log").write_text(out.stdout + out.stderr)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        # the SuperLink knows exactly the three registered devices, all online; the fourth
        # (unregistered key) is not among them
        out = subprocess.run([str(BIN / "flwr"), "supernode", "ls", "tls", "--format", "json"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        nodes = json.loads(out.stdout[out.stdout.index("{"):])["nodes"]
        assert sorted(n["status"] for n in nodes) == ["online"] * 3, nodes
        # the device with the unregistered key was refused and `lpm edge run` exited non-zero
        refused = procs[-1]
        assert refused.wait(30) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "edge3.log").read_text()

        import torch

        from coordinator.store import CoordinatorStore
        from simulation.engine import simulate
        from simulation.models import SIR
        from simulation.population import synthesize

        deadline = time.time() + 120
        store = CoordinatorStore(db)
        while store.get_run("tls").status != "completed":
            assert time.time() < deadline, (tmp_path / "flwr-run.log").read_text()[-3000:]
            time.sleep(1)
        series = store.series("tls")
        assert [r["day"] for r in series] == [1, 2]
        with torch.no_grad():
            ref = simulate(SIR(0.5, 0.1, 0.05), synthesize("tiny", seed=4), 2, 4)
        assert [r["I"] for r in series] == ref["I"][1:].tolist()
        assert [r["new_infections"] for r in series] == ref["new_infections"][1:].tolist()
        # each device kept its keys encrypted at rest in its own store, with its status
        from edge_agent.store import EdgeStore, WrongPassphraseError

        for path in stores[:3]:
            dev = EdgeStore(path, "device passphrase e2e")
            assert len(dev.get_private_key("tls/nb_key")) == 32
            assert len(dev.get_private_key("tls/identity")) == 32  # SecAgg+ identity
            assert len(dev.get_private_key("tls/u_seed")) == 32  # private event seed
            assert dev.status("run")["day"] == 1 and dev.contacts()
            dev.close()
            with pytest.raises(WrongPassphraseError):
                EdgeStore(path, "wrong").get_private_key("tls/nb_key")
    finally:
        e2e.stop(procs)
