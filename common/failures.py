"""Who a compute replica's failed call is about, as the gateway must know to act on it.

The replica sends it as the call's trailing metadata FAILURE_SCOPE_KEY (internal API only):
- REQUEST_SCOPE: this request failed by itself (its own data hit an error the rest of the batch
  did not). The gateway ends it with the replica's message, never continues it elsewhere (it
  would only fail there too) and never counts it against the replica's health.
- REPLICA_SCOPE: a healthy replica gives the request up for its own reasons (draining, its memory
  link is down). The gateway continues it elsewhere; no replica died.
- no scope: the replica broke while running it (killed, stopped answering). The gateway continues
  it elsewhere and counts a replica death against the request: a request whose replicas died
  under it `max_replica_deaths` times is a query of death and is failed, not moved again.
"""

from __future__ import annotations

FAILURE_SCOPE_KEY = "failure-scope"
REQUEST_SCOPE = "request"
REPLICA_SCOPE = "replica"


def failure_scope(trailing_metadata) -> str:
    """The scope a finished call's trailing metadata names ("" for none)."""
    for key, value in trailing_metadata or ():
        if key == FAILURE_SCOPE_KEY:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return ""
