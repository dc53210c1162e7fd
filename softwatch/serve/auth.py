"""Who gets in: the API key of the ingress, read where the ingress replica runs.

The key never travels in the Serve config (whose args anyone with `serve config` or the
dashboard reads): a replica takes it from `$SOFTWATCH_API_KEY` (a Kubernetes secret as env) or
from the file `api_key_file` names (a mounted secret; `softwatch serve --api-key` writes one).
"""

from __future__ import annotations

import hmac
import logging
import os

log = logging.getLogger("softwatch.serve")

ENV_VAR = "SOFTWATCH_API_KEY"


class MissingApiKey(RuntimeError):
    """The deployment requires a key and none was given: the ingress refuses to start."""


def load_api_key(api_key_file: str | None, require: bool) -> str | None:
    """The key from `api_key_file`, else from $SOFTWATCH_API_KEY; None (an open API, with a
    warning) only when the deployment does not require one."""
    key = _read(api_key_file) if api_key_file else os.environ.get(ENV_VAR, "").strip()
    if key:
        return key
    if require:
        where = f"the file {api_key_file}" if api_key_file else f"${ENV_VAR} on this node"
        raise MissingApiKey(f"require_api_key is set but {where} holds no key: refusing to serve an open API")
    log.warning("softwatch: no API key (neither api_key_file nor $%s): every route is open to anyone who "
                "reaches this service", ENV_VAR)
    return None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        raise MissingApiKey(f"cannot read the API key file {path}: {exc.strerror}") from None


def authorized(key: str | None, authorization: str) -> bool:
    """Whether an `Authorization` header carries the key (constant-time compare)."""
    if not key:
        return True
    return authorization.startswith("Bearer ") and hmac.compare_digest(authorization[7:].encode(), key.encode())
