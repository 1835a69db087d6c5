"""Starting Prefect's API before a flow runs, with a window that fits a loaded machine.

Without ``PREFECT_API_URL`` Prefect starts a temporary ("ephemeral") API server in a subprocess
the first time a flow needs it, and gives it ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``
(20 s by default) to answer. Its first start on a fresh home creates the SQLite database, and on a
2-core machine whose cores another job keeps busy that takes longer than 20 s. So the server is
started here, before any flow: with a longer default window (a user's own setting of that
variable, in the environment or a Prefect profile, is kept), once more if the first start times
out, and when both fail with :class:`PrefectStartupError`, one line naming the setting to raise
or ``PREFECT_API_URL`` for a long-lived server. Flows then reuse the running server: Prefect keeps
one ephemeral server per process and starting it again is a no-op.

Called by the CLI before any command; any other entry point (a Python API) calls
:func:`ensure_prefect_api` the same way.
"""

from __future__ import annotations

import os

#: The variable Prefect reads for the ephemeral server's start-up window, in seconds.
STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
#: Prefect's own default for that window; a profile value other than this one is the user's.
PREFECT_DEFAULT_WINDOW = 20
#: Our default window: a first start on a fresh home under full load of both cores of a 2-core
#: machine stays well inside it (bench/prefect_startup.py), and a server that cannot answer in
#: it is broken rather than slow.
DEFAULT_WINDOW = 120
#: Starts tried in all before giving up.
ATTEMPTS = 2


class PrefectStartupError(RuntimeError):
    """Prefect's ephemeral API server did not answer within its start-up window."""


def configure_environment() -> None:
    """Settings every loaq process wants before Prefect is imported (a user's own values win)."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def startup_window() -> int:
    """The start-up window in seconds: the user's setting if there is one, else ``DEFAULT_WINDOW``."""
    if os.environ.get(STARTUP_SETTING):
        return int(float(os.environ[STARTUP_SETTING]))
    from prefect.settings import get_current_settings

    configured = get_current_settings().server.ephemeral.startup_timeout_seconds  # profile or default
    return configured if configured != PREFECT_DEFAULT_WINDOW else DEFAULT_WINDOW


def ensure_prefect_api(window: int | None = None, attempts: int = ATTEMPTS) -> str | None:
    """Make sure a Prefect API answers; the ephemeral server's URL, or None for a configured one.

    With ``PREFECT_API_URL`` set nothing is started (the server there is the user's). Otherwise
    the ephemeral server is started with ``window`` seconds (default :func:`startup_window`) per
    attempt; a start that times out is stopped before the next one.
    """
    configure_environment()
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    # The environment is read too: an in-process settings context need not reflect a later change.
    if os.environ.get("PREFECT_API_URL") or settings.api.url:
        return None
    if not settings.server.ephemeral.enabled:
        return None  # Prefect itself then says that it needs PREFECT_API_URL
    from prefect.server.api.server import SubprocessASGIServer

    window = startup_window() if window is None else int(window)
    # Prefect reads the window again wherever it starts the server itself (it is then running).
    os.environ[STARTUP_SETTING] = str(window)
    failure = ""
    for _ in range(max(1, attempts)):
        server = SubprocessASGIServer()
        try:
            server.start(timeout=window)
            return server.api_url
        except RuntimeError as e:
            failure = str(e).split(".")[0]
            server.stop()
            server.server_process = None
            server.running = False
    raise PrefectStartupError(
        f"Prefect's local API server did not start within {window} s ({attempts} tries; {failure}): "
        f"raise {STARTUP_SETTING} (e.g. {STARTUP_SETTING}={2 * window}) on a busy machine, or start a "
        f"long-lived server with `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
    )
