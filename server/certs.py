"""Certificates and keys for a TLS federation with SuperNode authentication (docs/deploy.md).

Makes, with ``cryptography`` (no ``openssl`` binary needed):

- ``ca.crt`` / ``ca.key``: a private certificate authority. ``ca.crt`` goes to every site (their
  ``flwr-client start --root-certificates``) and into the coordinator's ``$FLWR_HOME/config.toml``;
  ``ca.key`` never leaves the coordinator.
- ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for
  ``localhost``, ``127.0.0.1``, ``::1`` and every ``--host`` given (the SuperLink's DNS names / IPs).
- ``<site>/<site>`` and ``<site>/<site>.pub`` for each ``--site``: an ECDSA P-384 key pair in
  OpenSSH format (the format ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read). In a real deployment each site makes its own pair
  (``python -m server.certs --out DIR --site NAME --no-ca``, or ``ssh-keygen -t ecdsa -b 384``)
  and sends only the ``.pub`` file to the coordinator.

Usage::

    python -m server.certs --out certs --host superlink.example.org --site site-01 --site site-02
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):  # ordered, unique
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_ca(out: Path, days: int = 3650, name: str = "hemexp federation CA") -> tuple[Path, Path]:
    """``ca.crt`` and ``ca.key`` under ``out``."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return (
        _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM)),
        _write(out / "ca.key", _pem_key(key), private=True),
    )


def make_server_cert(out: Path, hosts: Iterable[str] = (), days: int = 825) -> tuple[Path, Path]:
    """``server.crt`` / ``server.key`` signed by ``out/ca.key``, for loopback plus ``hosts``."""
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    all_hosts = [*hosts, *LOOPBACK_NAMES]
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(all_hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return (
        _write(out / "server.crt", cert.public_bytes(serialization.Encoding.PEM)),
        _write(out / "server.key", _pem_key(key), private=True),
    )


def make_site_keys(out: Path, site: str) -> tuple[Path, Path]:
    """``out/<site>/<site>`` (OpenSSH private key) and ``out/<site>/<site>.pub`` (ECDSA P-384)."""
    if not site or "/" in site or site.startswith("."):
        raise ValueError(f"bad site name {site!r}")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return (
        _write(out / site / site, private, private=True),
        _write(out / site / f"{site}.pub", public + f" {site}\n".encode()),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.certs", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder to write into")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="DNS name or IP of the SuperLink (repeatable); loopback is always included",
    )
    p.add_argument("--site", action="append", default=[], help="site name to make a key pair for (repeatable)")
    p.add_argument("--no-ca", action="store_true", help="only the site key pairs (what a site runs for itself)")
    p.add_argument("--force", action="store_true", help="overwrite an existing CA")
    args = p.parse_args(argv)
    if not args.no_ca:
        if (args.out / "ca.key").exists() and not args.force:
            print(f"{args.out / 'ca.key'} exists: reusing that CA (--force makes a new one)", file=sys.stderr)
        else:
            print("CA:", *make_ca(args.out))
        print("SuperLink:", *make_server_cert(args.out, args.host))
    for site in args.site:
        print(f"{site}:", *make_site_keys(args.out, site))
    return 0


if __name__ == "__main__":
    sys.exit(main())
