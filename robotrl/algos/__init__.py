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


def typed_config(schema: type, raw: dict):
    """An algo's settings `raw` as its config dataclass `schema`; a value of the wrong type is
    named by its key (OmegaConf's message names the field without its `algo.` and the class)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw))
    except ValidationError as e:
        raise ValueError(f"algo.{e.full_key}: {str(e.msg).splitlines()[0]}") from None
