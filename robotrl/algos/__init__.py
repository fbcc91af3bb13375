"""The training methods; each algo's config checks its own values (`__post_init__`), starting with
`require_finite`."""
import dataclasses
import math


def require_finite(config) -> None:
    """Every float setting of an algo config is a finite number (a NaN passes every range check)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"algo.{field.name} must be a finite number, got {value}")
