"""One format for every configuration error: the key, the value, and what is allowed.

    check(cfg.lr > 0, "optim.lr", cfg.lr, "must be > 0")
    # ConfigError: optim.lr=-1.0 is invalid: must be > 0

Model configs, recipe sections (data, optim, training, ...) and recipe parsing all raise
through ``invalid``, so a user sees the same shape of message whichever layer refused a value.
"""

from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot be used."""


def invalid(key: str, value: Any, allowed: str) -> str:
    """The message for ``key=value`` being refused; ``allowed`` says what would be accepted."""
    return f"{key}={value!r} is invalid: {allowed}"


def check(ok: bool, key: str, value: Any, allowed: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error(invalid(key, value, allowed))`` unless ``ok``."""
    if not ok:
        raise error(invalid(key, value, allowed))
