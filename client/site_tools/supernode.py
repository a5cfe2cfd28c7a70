"""``flwr-client start``: join the federation by running Flower's ``flower-supernode`` for this site.

Validation and the command line are pure functions (``validate``, ``node_config``, ``build_command``,
``approved_command``); the edge (``start``) checks the site folder, builds the site cache once (so that
no round redoes the preprocessing: every message starts a fresh ClientApp process, docs/design.md §6),
checks that the SuperLink answers on TCP, then replaces this process with the SuperNode.

Approved apps only (docs/site-policy.md): the SuperNode is Flower's ``flower-supernode`` run through
``client.site_tools.approved_supernode``, which refuses the app of any run whose FAB the site did not
approve (``flwr-client trust``) before its ClientApp starts. A site that approved nothing does not
start, unless ``--any-app`` (demos, tests) runs plain ``flower-supernode``, any app the coordinator sends.

Rules (docs/design.md §5, deployment): TLS unless the SuperLink is on this machine's loopback
(``--insecure`` is for demos and tests only); with TLS, ``--root-certificates`` (the federation's CA)
is required; ``--auth-key`` is the site's OpenSSH ECDSA private key whose public half the
coordinator registered with ``flwr supernode register``.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from client.data.cache import build_site_cache
from client.ingest.layouts import LAYOUTS, site_layout
from client.ingest.site_settings import read_site_settings
from client.site_tools.app_trust import ENTITIES_FILE, read_approved, read_trusted_entities
from common.config import PreprocessConfig
from common.records import NODE_CACHE_DIR, NODE_DATA_PATH, NODE_DEVICE, NODE_SITE_ID


class StartError(ValueError):
    """A reason not to start, worded for the site's IT staff."""


@dataclass(frozen=True)
class StartOptions:
    superlink: str
    data: Path
    cache_dir: Path
    site_id: str | None = None
    root_certificates: Path | None = None
    auth_key: Path | None = None
    insecure: bool = False
    device: str | None = None
    max_retries: int | None = None
    max_wait_time: float | None = None
    clientappio_port: int | None = None  # flower-supernode's local Runtime API port (default 9094)
    any_app: bool = False  # run whatever app the coordinator sends (no approval at the SuperNode)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port)."""
    address = address.strip()
    if "://" in address:
        raise StartError(f"--superlink {address!r}: give HOST:PORT without a URL scheme")
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise StartError(f"--superlink {address!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or not host:
            raise StartError(f"--superlink {address!r}: expected HOST:PORT")
        if ":" in host:
            raise StartError(f"--superlink {address!r}: write an IPv6 address as [ADDRESS]:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise StartError(f"--superlink {address!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise StartError(f"--superlink {address!r}: port {port} out of range")
    return host, port


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost`` (by name: no resolver is asked)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(opts: StartOptions) -> tuple[str, int]:
    """Check the options against the deployment rules; return the SuperLink's (host, port)."""
    host, port = parse_address(opts.superlink)
    if opts.insecure:
        if not is_loopback(host):
            raise StartError(
                f"--insecure refused: the SuperLink {host}:{port} is not on this machine's loopback "
                "(127.0.0.0/8, localhost, ::1). Across machines the connection must use TLS: pass "
                "--root-certificates CA.crt (the federation's CA certificate) instead."
            )
        if opts.root_certificates is not None:
            raise StartError("--insecure and --root-certificates exclude each other")
        if opts.auth_key is not None:
            raise StartError(
                "--auth-key needs TLS (SuperNode authentication is refused by the SuperLink "
                "without it): drop --insecure and pass --root-certificates"
            )
    else:
        if opts.root_certificates is None:
            raise StartError(
                "--root-certificates CA.crt is required (the federation's CA certificate, "
                "from the coordinator); --insecure is only for a SuperLink on loopback"
            )
        if not Path(opts.root_certificates).is_file():
            raise StartError(f"--root-certificates {opts.root_certificates}: no such file")
    if opts.auth_key is not None and not Path(opts.auth_key).is_file():
        raise StartError(f"--auth-key {opts.auth_key}: no such file")
    data = Path(opts.data)
    if not data.is_dir():
        raise StartError(f"--data {data}: no such folder")
    if site_layout(data) is None:
        raise StartError(
            f"--data {data}: not a site folder (none of {', '.join(lay.marker_dir + '/' for lay in LAYOUTS)} inside); "
            f"run `flwr-client check {data}`"
        )
    if opts.site_id is not None and not opts.site_id.strip():
        raise StartError("--site-id is empty")
    return host, port


def _toml_string(value: str, what: str) -> str:
    """A TOML literal string as ``--node-config`` reads it (no escapes, so Windows paths survive)."""
    if "'" in value or "\n" in value or '"' in value:
        raise StartError(f"{what} {value!r}: quotes and newlines are not supported in node config values")
    return f"'{value}'"


def node_config(opts: StartOptions, site_id: str) -> str:
    """The ``--node-config`` value: what the ClientApp reads in deployment (``common.records``)."""
    pairs = {
        NODE_DATA_PATH: str(Path(opts.data).expanduser().resolve()),
        NODE_SITE_ID: site_id,
        NODE_CACHE_DIR: str(Path(opts.cache_dir).expanduser().resolve()),
    }
    if opts.device:
        pairs[NODE_DEVICE] = opts.device
    return " ".join(f"{k}={_toml_string(v, k)}" for k, v in pairs.items())


def build_command(
    opts: StartOptions, site_id: str, executable: str = "flower-supernode", trusted_entities: Path | None = None
) -> list[str]:
    """The ``flower-supernode`` command line (validate ``opts`` first); ``trusted_entities``: Flower's
    ``--trusted-entities`` file (the site's signers, ``client.site_tools.app_trust``)."""
    cmd = [executable, "--superlink", opts.superlink]
    if opts.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(Path(opts.root_certificates).expanduser().resolve())]
    if opts.auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(opts.auth_key).expanduser().resolve())]
    if opts.max_retries is not None:
        cmd += ["--max-retries", str(opts.max_retries)]
    if opts.max_wait_time is not None:
        cmd += ["--max-wait-time", str(opts.max_wait_time)]
    if opts.clientappio_port is not None:
        cmd += ["--host", "127.0.0.1", "--port", str(opts.clientappio_port)]
    if trusted_entities is not None:
        cmd += ["--trusted-entities", str(Path(trusted_entities).expanduser().resolve())]
    cmd += ["--node-config", node_config(opts, site_id)]
    return cmd


#: The SuperNode that runs approved apps only (``python -m`` of this module).
APPROVED_SUPERNODE = "client.site_tools.approved_supernode"


def approved_command(supernode_cmd: list[str], site_dir: Path, python: str = sys.executable) -> list[str]:
    """``supernode_cmd`` (``build_command``'s) run by the approving SuperNode of the site folder
    ``site_dir``. ``-P``: the current folder is not put on ``sys.path``, so nothing there can stand in
    for the site's installed package."""
    return [
        python,
        "-P",
        "-m",
        APPROVED_SUPERNODE,
        "--site-dir",
        str(Path(site_dir).expanduser().resolve()),
        "--",
        *supernode_cmd[1:],
    ]


def site_trust(opts: StartOptions) -> Path | None:
    """Check the site's approvals against ``--any-app``; return its trusted-entities file, if any.

    Without ``--any-app`` the site must have approved a FAB or trust a signer (else its SuperNode could
    run nothing); with it, the site must have approved neither (a flag must not silently override them).
    """
    data = Path(opts.data)
    try:
        approved, entities = read_approved(data), read_trusted_entities(data)
    except (OSError, ValueError) as exc:
        raise StartError(f"the site's app approvals are unreadable: {exc}") from None
    if opts.any_app:
        if approved or entities:
            raise StartError(
                f"--any-app refused: {data} approves {len(approved)} app(s) and trusts {len(entities)} signer(s); "
                "its SuperNode runs only those (drop --any-app, or remove them with `flwr-client trust`)"
            )
        return None
    if not (approved or entities):
        raise StartError(
            f"{data} has approved no app: its SuperNode would refuse every run. Review the coordinator's app "
            f"and approve it: `flwr-client trust approve {data} --fab APP.fab` (or --sha256 / --app-dir), or "
            f"trust its signer: `flwr-client trust add-key {data} KEY_ID KEY.pub`. "
            "--any-app (demos, tests) runs any app the coordinator sends."
        )
    return data / ENTITIES_FILE if entities else None


def launch_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The SuperNode's environment: never install app dependencies at run time."""
    env = dict(os.environ if environ is None else environ)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return env


def check_reachable(host: str, port: int, timeout: float = 5.0) -> None:
    """Raise ``StartError`` naming the address when nothing accepts a TCP connection there."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise StartError(
            f"cannot reach the SuperLink at {host}:{port} ({reason}). Check the address and port with "
            "the coordinator, that the SuperLink is running, and that a firewall lets this machine "
            "connect to that port."
        ) from None


def resolve_site_id(opts: StartOptions) -> str:
    if opts.site_id:
        return opts.site_id.strip()
    return read_site_settings(Path(opts.data)).site_id


def find_supernode() -> str:
    """``flower-supernode`` next to this interpreter (a virtual environment's bin), else on PATH."""
    here = Path(sys.executable).parent / "flower-supernode"
    if here.is_file():
        return str(here)
    found = shutil.which("flower-supernode")
    if not found:
        raise StartError("flower-supernode not found: install flwr in this environment")
    return found


def prepare_cache(opts: StartOptions, cfg: PreprocessConfig) -> str:
    """Build (or reuse) the site cache with the run's preprocessing ``cfg``; a one-line summary."""
    cache, problems = build_site_cache(opts.data, opts.cache_dir, cfg, progress=False)
    if not cache.n_slices:
        raise StartError(
            f"--data {opts.data}: no usable slices ({len(problems)} problems); run `flwr-client check {opts.data}`"
        )
    state = "reused" if cache.hit else "built"
    return f"cache {state}: {cache.path} ({cache.n_slices} slices, {cfg.size}x{cfg.size})"


def start(opts: StartOptions, prepare: PreprocessConfig | None, connect_timeout: float = 5.0) -> int:
    """Validate, prepare the cache for ``prepare`` (the run's preprocessing, ``client.site_tools.run_setup``;
    None: no cache), check the SuperLink answers, then ``exec`` ``flower-supernode``.

    Returns only on a refusal (exit status 2) or an unreachable SuperLink (3); otherwise this process
    becomes the SuperNode, so signals sent to it reach Flower directly.
    """
    try:
        host, port = validate(opts)
        site_id = resolve_site_id(opts)
        entities = site_trust(opts)
        if prepare is not None:
            print(prepare_cache(opts, prepare), flush=True)
        exe = find_supernode()
        cmd = build_command(opts, site_id, executable=exe, trusted_entities=entities)
        if not opts.any_app:
            exe, cmd = sys.executable, approved_command(cmd, opts.data)
    except ValueError as exc:  # a StartError, or an unreadable site.toml
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        check_reachable(host, port, connect_timeout)
    except StartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    approval = "any app (--any-app)" if opts.any_app else "approved apps only"
    print(f"site {site_id}: starting flower-supernode for {opts.superlink}, {approval}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(exe, cmd, launch_env())
    return 0  # not reached
