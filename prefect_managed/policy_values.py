"""The kinds of values a policy file holds: sizes in Docker's units within sane ranges,
numbers that are never a TOML boolean, infinite or NaN, and the strict model every policy
table is. Pure."""

from __future__ import annotations

from typing import Annotated, Any

from docker.errors import DockerException
from docker.utils import parse_bytes
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

__all__ = [
    "CacheSize",
    "Count",
    "DiskSize",
    "HostMemorySize",
    "LogSize",
    "MemorySize",
    "Number",
    "OutputSize",
    "StrictModel",
    "format_bytes",
]


def _size_between(low: int, high: int, zero_is_off: bool = False) -> AfterValidator:
    def check(value: str | int) -> str | int:
        try:
            size = parse_bytes(value)
        except DockerException as exc:
            raise ValueError(
                f"{value!r} is not a size; use Docker's units such as 512m or 2g"
            ) from exc
        if zero_is_off and size == 0:
            return value
        if size <= 0:
            raise ValueError(
                f"{value!r} must be 0 (off) or more"
                if zero_is_off
                else f"{value!r} must be more than zero"
            )
        if not low <= size <= high:
            raise ValueError(
                f"{value!r} is outside the sane range {format_bytes(low)} to {format_bytes(high)}"
            )
        return value

    return AfterValidator(check)


def _size_value(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{value!r} is not a size; use Docker's units such as 512m or 2g")
    return value


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is not a number; give a number")
    return value


#: A size in Docker's units (a string such as "2g", or a number of bytes), in a range.
MemorySize = Annotated[str | int, BeforeValidator(_size_value), _size_between(6 * 2**20, 2**40)]
CacheSize = Annotated[str | int, BeforeValidator(_size_value), _size_between(256 * 2**10, 2**42)]
LogSize = Annotated[str | int, BeforeValidator(_size_value), _size_between(2**20, 2**30)]
DiskSize = Annotated[str | int, BeforeValidator(_size_value), _size_between(2**30, 2**44)]
HostMemorySize = Annotated[
    str | int, BeforeValidator(_size_value), _size_between(2**20, 2**44, zero_is_off=True)
]
#: The same, or 0 for off.
OutputSize = Annotated[
    str | int, BeforeValidator(_size_value), _size_between(2**10, 2**26, zero_is_off=True)
]
#: Numbers: never a bool (TOML's `true` is not 1), never infinite or NaN.
Count = Annotated[int, BeforeValidator(_not_bool), Field(strict=True)]
Number = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]


def format_bytes(size: int) -> str:
    """2147483648 -> '2 GiB', 536870912 -> '512 MiB'."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} B"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
