"""The Hub's HTTP client, bounded: a timeout on every call, retries with backoff on 5xx answers.

huggingface_hub's own client waits forever by default (a Hub that accepts the connection and never
answers hangs a push), and many of its calls pass timeout=None. Every request through it gets
CONNECT_TIMEOUT_S to connect and a read timeout of HF_HUB_DOWNLOAD_TIMEOUT seconds when that is set
(huggingface_hub's own setting for its downloads, also its default for other requests), else
READ_TIMEOUT_S; a timeout a call sets itself is kept.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, TypeVar

from simpo_jax.errors import HubError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # to open a connection to the Hub
READ_TIMEOUT_S = 60.0  # for each answer (a commit of many files can take the Hub a while)
RETRIES = 3  # further tries of a call the Hub answered with a 5xx status
RETRY_WAIT_S = 2.0  # before the first retry; doubled before each next one

T = TypeVar("T")


def read_timeout() -> float:
    """Seconds to wait for an answer: HF_HUB_DOWNLOAD_TIMEOUT if set, else READ_TIMEOUT_S."""
    given = os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT") or READ_TIMEOUT_S
    try:
        seconds = float(given)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise HubError(f"HF_HUB_DOWNLOAD_TIMEOUT={given!r}: give the seconds to wait for each answer "
                       f"of the Hub, a positive number (unset: {READ_TIMEOUT_S:g}).")
    return seconds


_bounded = False  # whether huggingface_hub's shared client is ours


def bound() -> None:
    """Makes huggingface_hub's shared client time out; called before any Hub call."""
    global _bounded
    if not _bounded:
        from huggingface_hub import set_client_factory

        set_client_factory(_bounded_client)
        _bounded = True


def _bounded_client():
    """huggingface_hub's default client (its hooks, its redirects) with every timeout filled in."""
    # Not exported, but the very factory set_client_factory replaces: its offline check and
    # request ids stay as huggingface_hub has them in this version.
    from huggingface_hub.utils._http import default_client_factory

    client = default_client_factory()
    client.event_hooks["request"].append(_fill_timeouts)
    return client


def _fill_timeouts(request) -> None:
    """Gives a request without a connect, read, write or pool timeout the bound's."""
    read = read_timeout()
    limits = {"connect": min(CONNECT_TIMEOUT_S, read), "read": read, "write": read, "pool": read}
    given = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {k: v if given.get(k) is None else given[k]
                                     for k, v in limits.items()}


def with_retries(call: Callable[[], T], what: str) -> T:
    """call(), tried again while the Hub answers 5xx: RETRIES more times at most, after waiting
    RETRY_WAIT_S, then twice as long before each next try; the last try's error is raised."""
    wait = RETRY_WAIT_S
    for attempt in range(1, RETRIES + 1):
        try:
            return call()
        except Exception as e:
            status = server_status(e)
            if status is None:
                raise
            log.warning("%s: the Hub answered %d; retrying in %.0f s (%d of %d).", what, status,
                        wait, attempt, RETRIES)
        time.sleep(wait)
        wait *= 2
    return call()


def server_status(error: BaseException) -> int | None:
    """The 5xx status of a Hub answer `error` carries, else None."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    return status if isinstance(status, int) and 500 <= status < 600 else None


def first_line(error: BaseException) -> str:
    """'<type>: <the first line of its message>', short enough for a one-line error; a timeout
    says how long was waited and which setting sets it."""
    import httpx2

    text = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
    if isinstance(error, httpx2.TimeoutException):
        text += (f" (no answer within {read_timeout():g} s; HF_HUB_DOWNLOAD_TIMEOUT sets the "
                 "wait)")
    return text
