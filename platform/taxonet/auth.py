"""API tokens, read the same way by the HTTP API (taxonet.serve) and the review page (taxonet.review).

Tokens come only from the environment: ``TAXONET_API_TOKEN`` and/or the file named by ``TAXONET_API_TOKEN_FILE``
(a mounted Kubernetes Secret), comma- or newline-separated, whitespace stripped (a Secret written with ``echo`` ends
in a newline). Several tokens are accepted at once, for rotation. No Ray, no web framework: cheap to import.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

#: environment variable holding the API token(s)
TOKEN_ENV = "TAXONET_API_TOKEN"
#: environment variable naming a file (a mounted Secret) holding the API token(s)
TOKEN_FILE_ENV = "TAXONET_API_TOKEN_FILE"


def load_tokens(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The accepted tokens, in order, without duplicates. A named file that cannot be read is an error, never
    "no auth"."""
    environ = os.environ if environ is None else environ
    raw = environ.get(TOKEN_ENV, "")
    path = environ.get(TOKEN_FILE_ENV, "").strip()
    if path:
        try:
            raw += "\n" + Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise RuntimeError(f"{TOKEN_FILE_ENV}={path} cannot be read: {exc}") from exc
    return tuple(dict.fromkeys(token.strip() for token in re.split(r"[,\r\n]", raw) if token.strip()))
