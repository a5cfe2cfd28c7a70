"""Approved apps only, enforced outside the app (issue 27, item 1): the site's trust files
(``client.site_tools.app_trust``), what ``flwr-client start`` execs (``client.site_tools.supernode``),
and Flower's own SuperNode loop (``flwr.supernode.start_client_internal._pull_and_store_message``)
wrapped by ``client.site_tools.approved_supernode``: an unapproved FAB gets Flower's error reply and
is never stored for a ClientApp; an approved one is. The loopback run with real Flower processes is
``tests/test_app_approval.py``."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import socket
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flwr.app import ConfigRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign
from flwr.supercore.run import Run
from flwr.supernode import start_client_internal as sci
from flwr.supernode.nodestate import NodeStateFactory

from client.site_tools import approved_supernode, supernode
from client.site_tools.app_trust import (
    APPROVED_FILE,
    ENTITIES_FILE,
    approve,
    build_fab,
    fab_sha256,
    read_approved,
    read_trusted_entities,
    verdict,
)
from client.site_tools.approved_supernode import approved_only
from client.site_tools.cli import flwr_client_main
from tests.helpers.deployment import write_tiny_app
from tests.helpers.flower import make_message


@pytest.fixture
def apps(tmp_path) -> dict[str, bytes]:
    """Two FABs of the same app: the one the site reviewed, and one changed after (say, its policy mod removed)."""
    out = tmp_path / "out"
    return {
        label: build_fab(write_tiny_app(tmp_path / label / "tinyapp", out, label)) for label in ("approved", "modified")
    }


def site_folder(tmp_path: Path) -> Path:
    site = tmp_path / "site-t"
    (site / "dicom").mkdir(parents=True, exist_ok=True)
    return site


def ed25519_pair() -> tuple[ed25519.Ed25519PrivateKey, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return key, public.decode() + " reviewer@hub"


def hub_signed(fab: bytes, key: ed25519.Ed25519PrivateKey, key_id: str) -> Fab:
    """The FAB as a SuperLink hands out a Flower Hub app: signed as ``flwr app review`` signs
    (timestamp + sha256 of the FAB), the verifications laid out as the SuperLink's ``_format_verification``."""
    signed_at = 1_760_000_000
    signature = key.sign(create_message_to_sign(hashlib.sha256(fab).digest(), signed_at))
    entry = {"signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode(), "signed_at": signed_at}
    return Fab(fab_sha256(fab), fab, {key_id: json.dumps(entry), "valid_license": "Valid"})


# --- the trust files -----------------------------------------------------------------------------


def test_approve_a_fab_by_file_folder_or_digest(tmp_path, apps, capsys):
    site = site_folder(tmp_path)
    app_dir = tmp_path / "approved" / "tinyapp"
    assert flwr_client_main(["trust", "approve", str(site), "--app-dir", str(app_dir), "--note", "v1 reviewed"]) == 0
    digest = fab_sha256(apps["approved"])
    assert f"approved: {digest} sitetest/tinyapp 1.0.0" in capsys.readouterr().out
    fab_file = tmp_path / "tinyapp.fab"
    fab_file.write_bytes(apps["approved"])
    assert flwr_client_main(["trust", "approve", str(site), "--fab", str(fab_file)]) == 0  # the same FAB: once
    (entry,) = read_approved(site)
    assert (entry.sha256, entry.app, entry.version, entry.note) == (digest, "sitetest/tinyapp", "1.0.0", "v1 reviewed")
    assert flwr_client_main(["trust", "approve", str(site), "--sha256", "12ab"]) == 2
    assert "not a sha256 digest" in capsys.readouterr().err
    assert flwr_client_main(["trust", "list", str(site)]) == 0
    assert digest in capsys.readouterr().out
    assert flwr_client_main(["trust", "revoke", str(site), "--sha256", digest]) == 0
    assert read_approved(site) == [] and (site / APPROVED_FILE).is_file()


def test_a_trusted_signer_is_written_as_flower_reads_it(tmp_path):
    """``trust add-key`` writes Flower's ``--trusted-entities`` YAML, which flower-supernode's own
    reader and Ed25519 check accept; a key of another kind is refused."""
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities, _validate_public_keys_ed25519

    site = site_folder(tmp_path)
    _, public = ed25519_pair()
    key_file = tmp_path / "reviewer.pub"
    key_file.write_text(public + "\n")
    assert flwr_client_main(["trust", "add-key", str(site), "fpk_0001", str(key_file)]) == 0
    entities = _try_obtain_trusted_entities(site / ENTITIES_FILE)
    _validate_public_keys_ed25519(entities)
    assert entities == {"fpk_0001": public} == read_trusted_entities(site)
    ecdsa = ec.generate_private_key(ec.SECP384R1()).public_key()
    text = ecdsa.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    assert flwr_client_main(["trust", "add-key", str(site), "fpk_0002", text]) == 2
    assert read_trusted_entities(site) == {"fpk_0001": public}


def test_verdict_by_digest_or_flower_signature(apps):
    approved, modified = apps["approved"], apps["modified"]
    digests = {fab_sha256(approved)}
    assert verdict(Fab(fab_sha256(approved), approved, {}), digests, None) is None
    refusal = verdict(Fab(fab_sha256(modified), modified, {}), digests, None)
    assert refusal == (
        f"this site has not approved this app (FAB sha256 {fab_sha256(modified)}: not on its approved list, "
        "not signed by an entity it trusts)"
    )
    # the digest is the content's: a FAB claiming the approved hash is judged by its bytes
    assert verdict(Fab(fab_sha256(approved), modified, {}), digests, None) is not None

    key, public = ed25519_pair()
    other, _ = ed25519_pair()
    trusted = {"fpk_reviewer": public}
    assert verdict(hub_signed(modified, key, "fpk_reviewer"), set(), trusted) is None
    assert verdict(hub_signed(modified, other, "fpk_reviewer"), set(), trusted) is not None  # forged
    assert verdict(hub_signed(modified, key, "fpk_someone"), set(), trusted) is not None  # not a trusted id
    unlicensed = hub_signed(modified, key, "fpk_reviewer")
    del unlicensed.verifications["valid_license"]
    assert verdict(unlicensed, set(), trusted) is not None


# --- what `flwr-client start` execs ----------------------------------------------------------------


def start_argv(site: Path, port: int, *extra: str) -> list[str]:
    return ["start", "--superlink", f"127.0.0.1:{port}", "--data", str(site), "--insecure", "--no-prepare", *extra]


def test_a_site_that_approved_nothing_does_not_start(tmp_path, capsys):
    site = site_folder(tmp_path)
    assert flwr_client_main(start_argv(site, 9)) == 2
    assert f"{site} has approved no app: its SuperNode would refuse every run" in capsys.readouterr().err
    approve(site, "ab" * 32)
    assert flwr_client_main(start_argv(site, 9, "--any-app")) == 2
    assert "--any-app refused" in capsys.readouterr().err


def test_start_execs_the_approving_supernode(tmp_path, monkeypatch):
    """The exact command ``flwr-client start`` replaces itself with: Flower's flower-supernode
    arguments, run by the approving entry point of this interpreter, with the site's signers."""
    site = site_folder(tmp_path)
    approve(site, "ab" * 32)
    _, public = ed25519_pair()
    (site / ENTITIES_FILE).write_text(f"fpk_0001: '{public}'\n")
    execs = []
    monkeypatch.setattr(supernode.os, "execve", lambda exe, cmd, env: execs.append((exe, cmd, env)))
    with socket.socket() as listener:  # a SuperLink port that answers on TCP
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert flwr_client_main(start_argv(site, port)) == 0
    ((exe, cmd, env),) = execs
    assert exe == sys.executable
    assert cmd[:7] == [
        sys.executable,
        "-P",
        "-m",
        supernode.APPROVED_SUPERNODE,
        "--site-dir",
        str(site.resolve()),
        "--",
    ]
    flower = cmd[7:]
    assert flower[:3] == ["--superlink", f"127.0.0.1:{port}", "--insecure"]
    assert flower[flower.index("--trusted-entities") + 1] == str((site / ENTITIES_FILE).resolve())
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"

    execs.clear()
    (site / APPROVED_FILE).unlink()
    (site / ENTITIES_FILE).unlink()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert flwr_client_main(start_argv(site, listener.getsockname()[1], "--any-app")) == 0
    ((exe, cmd, _),) = execs
    assert Path(exe).name == "flower-supernode" and cmd[0] == exe and "--trusted-entities" not in cmd


# --- Flower's SuperNode loop, wrapped ---------------------------------------------------------------


def pull_one(fn, fab: Fab):
    """Run Flower's ``_pull_and_store_message`` (or ``fn`` wrapping it) on one new run's message, with
    Flower's in-memory NodeState and ObjectStore and the SuperLink's calls faked; the state after."""
    objects = ObjectStoreFactory()
    state, store = NodeStateFactory(objectstore_factory=objects).state(), objects.store()
    state.set_node_id(7)
    msg = make_message(RecordDict({"q": ConfigRecord({"x": 1})}), "query")
    contents = {k: v.deflate() for k, v in get_all_nested_objects(msg).items()}
    run = dataclasses.replace(
        Run.create_empty(msg.metadata.run_id), fab_hash=fab.hash_str, fab_id="sitetest/tinyapp", fab_version="1.0.0"
    )
    pending = [(msg, get_object_tree(msg))]
    run_id = fn(
        state=state,
        object_store=store,
        node_config={},
        receive=lambda: pending.pop() if pending else None,
        get_run=lambda _: run,
        get_fab=lambda _hash, _run: fab,
        pull_object=lambda _run, object_id: contents[object_id],
        confirm_message_received=lambda _run, _id: None,
        trusted_entities=None,
    )
    return run_id, state


def test_the_supernode_refuses_an_unapproved_fab_before_any_clientapp(tmp_path, apps):
    site = site_folder(tmp_path)
    approve(site, fab_sha256(apps["approved"]))
    gated = approved_only(sci._pull_and_store_message, site)

    modified = Fab(fab_sha256(apps["modified"]), apps["modified"], {})
    run_id, state = pull_one(gated, modified)
    (reply,) = state.get_messages_legacy(is_reply=True)
    assert reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB
    assert f"FAB sha256 {modified.hash_str}" in reply.error.reason
    # nothing of the app was kept: no run, no FAB, no instruction for a ClientApp to pull
    assert state.get_run(run_id) is None and state.get_fab(modified.hash_str) is None
    assert state.get_messages_legacy(is_reply=False) == []

    approved = Fab(fab_sha256(apps["approved"]), apps["approved"], {})
    run_id, state = pull_one(gated, approved)
    assert state.get_messages_legacy(is_reply=True) == []
    assert state.get_run(run_id) is not None and state.get_fab(approved.hash_str).content == apps["approved"]
    assert len(state.get_messages_legacy(is_reply=False)) == 1  # the ClientApp's instruction, stored

    # a key added or an approval revoked is read at the next run: revoked, the same FAB is refused
    (site / APPROVED_FILE).write_text("")
    _, state = pull_one(gated, approved)
    assert state.get_messages_legacy(is_reply=True)[0].has_error()


def test_flowers_own_check_refuses_every_locally_built_fab(apps):
    """Why the wrapper: with --trusted-entities alone, Flower 1.42 refuses a FAB that ``flwr run .``
    sent (no verifications: the SuperLink attaches signatures only to Flower Hub apps), approved or not."""
    _, public = ed25519_pair()
    fab = Fab(fab_sha256(apps["approved"]), apps["approved"], {})
    _, state = pull_one(
        lambda **kw: sci._pull_and_store_message(**{**kw, "trusted_entities": {"fpk_0001": public}}), fab
    )
    (reply,) = state.get_messages_legacy(is_reply=True)
    assert reply.error.code == ErrorCode.INVALID_FAB and reply.error.reason == "The FAB could not be verified."


def test_another_flwr_release_is_not_silently_unenforced(tmp_path, monkeypatch):
    monkeypatch.setattr(sci, "_pull_and_store_message", lambda *, state, receive: None)
    with pytest.raises(SystemExit, match="differs from the one hemexp's app approval was written for"):
        approved_supernode.install(tmp_path)
