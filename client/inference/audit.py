"""What the clinic tools may write about a study: keyed pseudonyms, reasons without paths or UIDs,
and one audit line per study.

Logs, audit files and the batch summary leave the PACS's protection (they are read by IT staff and
sent in support requests), so no patient identifier, UID, file or folder name goes into them; the
site's pseudonym key (the one the site cache uses) lets the hospital re-identify a line.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from client.data.cache import DEFAULT_CACHE, pseudonym, site_secret
from client.ingest.dicom import StudyError

#: A reason cut at its first ": " keeps the kind and drops the detail (UIDs, file names, paths).
_DETAIL = re.compile(r"(: | \(| from ).*$", re.S)
#: Paths and UIDs in the message of an error that is not a ``StudyError``.
_PATH_OR_UID = re.compile(r"\S*/\S*|\d+(?:\.\d+){3,}")


class Pseudonymiser:
    """Keyed pseudonyms with the site's secret: the same study gets the same name at this site."""

    def __init__(self, key_dir: Path | None = None):
        self._secret = site_secret(Path(key_dir) if key_dir else DEFAULT_CACHE)

    def __call__(self, kind: str, identifier: str) -> str:
        return pseudonym(self._secret, kind, identifier)


def public_reason(exc: BaseException) -> str:
    """Why a study was not scored, free of paths, UIDs and file names."""
    if not isinstance(exc, StudyError):
        first = str(exc).splitlines()[0] if str(exc) else ""
        text = _DETAIL.sub("", _PATH_OR_UID.sub("", first).strip(" :"))
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    head = exc.reason.split(": ")[0]
    kinds = Counter(_DETAIL.sub("", p.reason) for p in exc.problems if p.path != exc.path)
    if not kinds:
        return head
    return f"{head} ({'; '.join(f'{k} x{n}' for k, n in kinds.most_common(3))})"


def audit_line(**fields: object) -> str:
    """``time=... key=value ...``: one line, values with spaces quoted, for grep and log shippers."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    parts = [f"time={stamp}"]
    for key, value in fields.items():
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        parts.append(f'{key}="{text}"' if " " in text or not text else f"{key}={text}")
    return " ".join(parts)
