"""The one way stage configs (frozen dataclasses) turn into JSON-able dicts and back."""
from __future__ import annotations

from dataclasses import asdict
from typing import TypeVar

C = TypeVar("C")


class DictConfig:
    """Mixin for frozen dataclass configs: ``to_dict`` (tuples as lists) and a checked ``from_dict``."""

    name = "config"  # used in error messages

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls: type[C], d: dict) -> C:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown {cls.name} keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def pick(cls: type[C], size: "str | dict | C", presets: dict[str, C]) -> C:
        """A preset name, a dict of fields (``preset``: start from that preset and change the others), or a
        config itself."""
        if isinstance(size, cls):
            return size
        if isinstance(size, dict):
            if "preset" in size:
                changes = {k: v for k, v in size.items() if k != "preset"}
                return cls.from_dict({**cls.pick(size["preset"], presets).to_dict(), **changes})
            return cls.from_dict(size)
        if size not in presets:
            raise ValueError(f"unknown {cls.name.removesuffix(' config')} size {size!r}; choose one of {sorted(presets)}")
        return presets[size]
