"""What every config section shares: unknown keys refused, and numbers read as secrets where YAML made them ints."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


def numeric_secret(value: Any) -> Any:
    """A password written as a bare number in YAML (`credential: 12345`) arrives as an int: keep its digits."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ConfigSection(BaseModel):
    """A block of the config file: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")  # a typo in the config file is an error, not a default
