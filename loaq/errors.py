"""The errors that are the user's to fix: the CLI prints them as one line, without a traceback."""

from __future__ import annotations

import errno


def user_error_types() -> tuple[type[BaseException], ...]:
    from loaq.configs.load import ConfigError
    from loaq.data.checksums import DataFileError
    from loaq.data.sources import CalibrationDataError
    from loaq.models.adapters import UnsupportedArchitecture
    from loaq.models.checkpoint import CheckpointError
    from loaq.prefect_startup import PrefectStartupError
    from loaq.quant import HessianDampingError
    from loaq.store.errors import StoreError

    return (ConfigError, CheckpointError, UnsupportedArchitecture, StoreError, DataFileError, HessianDampingError,
            PrefectStartupError, CalibrationDataError)


def describe(exc: BaseException) -> str | None:
    """One line for a user-fixable error (walking the cause chain), or None for a bug."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, user_error_types()):
            return str(exc)
        if isinstance(exc, PermissionError):
            return f"permission denied: {exc.filename or exc} (choose a writable store.url or fix its permissions)"
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return f"no space left on device while writing {exc.filename or 'the store'}; free space or move store.url"
        exc = exc.__cause__ or exc.__context__
    return None
