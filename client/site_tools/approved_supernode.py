"""``flower-supernode`` that runs only the apps its site approved: what ``flwr-client start`` execs.

Flower 1.42's SuperNode looks at a run's app in one place, when it first sees the run:
``flwr.supernode.start_client_internal._pull_and_store_message`` fetches the run's FAB from the
SuperLink and, with ``--trusted-entities``, refuses it (an error reply, ``FAB_VERIFICATION_ERROR``)
unless a trusted key signed it through Flower Hub; only then is the FAB stored for the ClientApp
process to fetch. A FAB that ``flwr run .`` sends carries no signature (the SuperLink keeps
signatures only for apps it fetched from Flower Hub), so Flower's check alone would refuse every
such app. This entry point runs Flower's own ``flower_supernode`` with that one function wrapped:
the FAB is fetched as before, and accepted only when its sha256 is in the site's
``approved-apps.toml`` (read again for every new run) or Flower's signature check passes
(``client.site_tools.app_trust.verdict``); otherwise the run's message gets Flower's error reply for a
FAB it could not verify, naming the digest, and nothing of the app is stored or started.

The SuperNode process never imports the app's code: what runs here is the site's installed package
and Flower. If Flower's function does not have the signature this wrapper was written against
(another flwr release), the SuperNode does not start: an unenforced approval must not look enforced.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from client.site_tools.app_trust import fab_sha256, read_approved, verdict

#: The keyword parameters of Flower 1.42's ``_pull_and_store_message`` that the wrapper relies on.
EXPECTED_PARAMETERS = (
    "state",
    "object_store",
    "node_config",
    "receive",
    "get_run",
    "get_fab",
    "pull_object",
    "confirm_message_received",
    "trusted_entities",
)


class AppRefused(Exception):
    """The FAB of a new run is not approved by this site (``reason`` is safe to send)."""

    def __init__(self, reason: str, run_id: int) -> None:
        super().__init__(reason)
        self.reason, self.run_id = reason, run_id


def approved_digests(site_dir: Path) -> set[str] | None:
    """The site's approved FAB digests, read now; None when the file is unreadable (nothing runs)."""
    from flwr.supercore import log

    try:
        return {a.sha256 for a in read_approved(site_dir)}
    except (OSError, ValueError) as exc:
        log(ERROR, "approved apps unreadable, refusing every app: %s", exc)
        return None


def approved_only(original: Callable[..., int | None], site_dir: Path) -> Callable[..., int | None]:
    """``original`` (Flower's ``_pull_and_store_message``) that refuses the FAB of any run this site did
    not approve, with the error reply Flower gives a FAB it could not verify."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supercore import log
    from flwr.supernode import start_client_internal as sci

    def pull_and_store(
        *, state: Any, object_store: Any, receive: Callable, get_fab: Callable, trusted_entities: Any, **rest: Any
    ) -> int | None:
        received: list[Any] = []

        def receive_and_keep() -> Any:
            got = receive()
            received[:] = [got[0]] if got is not None else []
            return got

        def approved_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            digests = approved_digests(site_dir)
            reason = (
                "this site's list of approved apps is unreadable; no app runs until its IT fixes it"
                if digests is None
                else verdict(fab, digests, trusted_entities)
            )
            if reason is not None:
                raise AppRefused(reason, run_id)
            log(INFO, "app approved by this site: FAB sha256 %s", fab_sha256(fab.content))
            return fab

        try:
            return original(
                state=state,
                object_store=object_store,
                receive=receive_and_keep,
                get_fab=approved_fab,
                trusted_entities=None,  # checked above, with the site's approved digests beside the signatures
                **rest,
            )
        except AppRefused as exc:
            log(ERROR, "app refused before it runs: %s", exc.reason)
            reply = Message(Error(ErrorCode.INVALID_FAB, exc.reason), reply_to=received[0])
            sci._insert_message(reply, state, object_store)
            return exc.run_id

    return pull_and_store


def install(site_dir: Path) -> None:
    """Wrap Flower's function in place (``start_client_internal`` looks it up at every call); refuse
    (SystemExit) when this flwr is not the one the wrapper was written for."""
    from flwr.supernode import start_client_internal as sci

    original = sci._pull_and_store_message
    params = tuple(inspect.signature(original).parameters)
    if params != EXPECTED_PARAMETERS:
        raise SystemExit(
            "error: this flwr's SuperNode differs from the one hemexp's app approval was written for "
            f"(flwr 1.42: {', '.join(EXPECTED_PARAMETERS)}; here: {', '.join(params)}); not starting"
        )
    sci._pull_and_store_message = approved_only(original, site_dir)


def main(argv: list[str] | None = None) -> None:
    """``python -m client.site_tools.approved_supernode --site-dir DIR -- FLOWER-SUPERNODE-ARGS...``"""
    parser = argparse.ArgumentParser(prog="hemexp approved supernode", description=__doc__.splitlines()[0])
    parser.add_argument("--site-dir", type=Path, required=True, help="the site folder (approved-apps.toml)")
    parser.add_argument("flower_args", nargs=argparse.REMAINDER, help="-- and flower-supernode's arguments")
    args = parser.parse_args(argv)
    rest = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    install(args.site_dir.resolve())
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
