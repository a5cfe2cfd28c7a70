"""Site failures as the server sees them: by type only, the traceback kept in the site's log,
because an exception's text may hold a file path, and file paths hold patient ids."""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from logging import ERROR

from flwr.app import Context, Message
from flwr.common.logger import log


class SiteError(RuntimeError):
    """A site failure whose message is safe to send to the server (no path, no identifier)."""


def site_errors(phase: str) -> Callable:
    """Log a failure in full at the site; send the server only its type."""

    def decorate(fn: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
        @functools.wraps(fn)
        def handler(msg: Message, context: Context) -> Message:
            try:
                return fn(msg, context)
            except SiteError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported by type, logged in full here
                log(ERROR, "%s failed at this site:\n%s", phase, traceback.format_exc())
                raise SiteError(f"{phase} failed ({type(exc).__name__}); details in the site's log") from None

        return handler

    return decorate
