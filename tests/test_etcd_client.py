"""The etcd client's transport against a real etcd serving TLS with client certificates: the daemon's calls go through
urllib3 itself (sidecar/claims/etcd_client.py, `_Client`), with the TLS settings requests was given, so a CA, a
client certificate and a hostname that do not match must each still be refused, and the right ones accepted.

The certificates are made here with the openssl command line; etcd is the binary the other etcd tests use.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("etcd3gw")  # before the etcd backend's modules, which import it

from sidecar.claims.etcd_client import EtcdDown, EtcdSession
from sidecar.config import EtcdConfig
from tests.support.etcd_server import etcd_binary
from tests.support.ports import free_ports

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(120)]


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.crt"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        key,
        "-out",
        cert,
    )
    return key, cert


def _signed(d: Path, name: str, ca: tuple[Path, Path], san: str) -> tuple[Path, Path]:
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt", d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", key, "-out", csr)
    _openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca[1],
        "-CAkey",
        ca[0],
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        ext,
        "-out",
        cert,
    )
    return key, cert


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real etcd member serving its clients over TLS and asking for a client certificate signed by its CA: (its
    URL, the directory of the certificates)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line")
    binary = etcd_binary()
    certs = tmp_path / "pki"
    certs.mkdir()
    ca = _ca(certs, "ca")
    server = _signed(certs, "server", ca, "IP:127.0.0.1")
    _signed(certs, "client", ca, "DNS:client")
    client_port, peer_port = free_ports(2)
    url, peer = f"https://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    with open(tmp_path / "etcd.log", "wb") as log:
        process = subprocess.Popen(
            [
                str(binary),
                f"--data-dir={tmp_path / 'etcd'}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                f"--cert-file={server[1]}",
                f"--key-file={server[0]}",
                f"--trusted-ca-file={ca[1]}",
                "--client-cert-auth",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield url, certs
    finally:
        process.kill()
        process.wait(10)


def _session(url: str, certs: Path, **tls: Path | None) -> EtcdSession:
    files = {"ca_file": certs / "ca.crt", "cert_file": certs / "client.crt", "key_file": certs / "client.key", **tls}
    return EtcdSession(EtcdConfig(endpoints=(url,), **files), request_timeout=2.0)


def test_calls_over_tls_are_made_with_the_configured_ca_and_client_certificate(tls_etcd: tuple[str, Path]) -> None:
    url, certs = tls_etcd
    session = _session(url, certs)
    deadline = time.monotonic() + 30
    while True:  # until the member has started and elected itself
        try:
            session.put("/tls/key", {"over": "tls"})
            break
        except EtcdDown:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert (found := session.get("/tls/key")) is not None and found.value == {"over": "tls"}
    lease = session.grant(5)
    assert session.create("/tls/claim", {"node": "n"}, lease) and not session.create("/tls/claim", {}, lease)

    other = certs / "other"
    other.mkdir()
    foreign_ca = _ca(other, "other-ca")
    foreign_key, foreign_cert = _signed(other, "c2", foreign_ca, "DNS:c2")
    refused = {
        "no client certificate": _session(url, certs, cert_file=None, key_file=None),
        "a CA that did not sign the server's": _session(url, certs, ca_file=foreign_ca[1]),
        "a client certificate of another CA": _session(url, certs, cert_file=foreign_cert, key_file=foreign_key),
        "the server's name not in its certificate": _session(url.replace("127.0.0.1", "localhost"), certs),
    }
    for why, session in refused.items():
        with pytest.raises(EtcdDown):
            session.get("/tls/key")
            pytest.fail(f"etcd answered a call made with {why}")
