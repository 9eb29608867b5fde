"""Options declared once: each stage's options are one frozen dataclass that
the builder method, the job function and the kernel share (the builder takes
it as ``options=`` or as its fields among the keyword arguments)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

OptionsT = TypeVar("OptionsT", bound="StageOptions")


class StageOptions:
    """Base of the stages' option dataclasses."""

    @classmethod
    def take(cls: type[OptionsT], options: OptionsT | None, kwargs: dict[str, Any]) -> tuple[OptionsT, dict[str, Any]]:
        """(options, the other kwargs): the fields of ``cls`` found in
        ``kwargs`` replace those of ``options`` (or of the defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        given = {k: kwargs[k] for k in kwargs if k in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        base = options if options is not None else cls()
        return (dataclasses.replace(base, **given) if given else base), rest  # type: ignore[type-var]
