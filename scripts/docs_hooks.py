"""mkdocs hooks: pages generated from the code, so that the docs cannot drift from it.

- ``settings.md`` is rendered from the pydantic model ``ManagedSettings`` at build time
  (field, environment variable, type, default, description); it is not committed.
- Every ``PREFECT_INTEGRATIONS_MANAGED_*`` name written in a page must be a field of
  that model; an unknown one is a warning, which ``mkdocs build --strict`` turns into a
  failed build.
"""

from __future__ import annotations

import logging
import re
import types
import typing
from typing import Any

from mkdocs.structure.files import File, Files
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from prefect_managed.settings import ManagedSettings

log = logging.getLogger("mkdocs.hooks.prefect_managed")

SETTINGS_PAGE = "settings.md"
ENV_PREFIX: str = ManagedSettings.model_config.get("env_prefix", "")
TOML_TABLE = ".".join(ManagedSettings.model_config.get("prefect_toml_table_header", ()))
_ENV_MENTION = re.compile(re.escape(ENV_PREFIX) + r"([A-Z][A-Z0-9_]*)")


def env_var(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


def type_name(annotation: Any) -> str:
    """`str | None` for `Optional[str]`, `Path` for `pathlib.Path`, ..."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return f"`{field.default_factory()!r}`"  # type: ignore[call-arg]
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "unset"
    value = field.default
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"`{text}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_settings_page() -> str:
    rows = [
        "| Setting | Environment variable | Type | Default | Description |",
        "|---|---|---|---|---|",
    ]
    for name, field in ManagedSettings.model_fields.items():
        rows.append(
            f"| `{name}` | `{env_var(name)}` | `{_cell(type_name(field.annotation))}` "
            f"| {default_text(field)} | {_cell(field.description or '')} |"
        )
    example = next(iter(ManagedSettings.model_fields), "name")
    return "\n".join(
        [
            "# Settings reference",
            "",
            "<!-- Generated from prefect_managed.settings.ManagedSettings by scripts/docs_hooks.py "
            "at build time; edit the model's field descriptions, not this page. -->",
            "",
            "The operator's settings of the worker, read once per worker process. Each one is "
            f"an environment variable `{ENV_PREFIX}<NAME>`, or a key of the "
            f"`[{TOML_TABLE}]` table of a `prefect.toml` file in the directory the worker "
            "starts in. Job variables of a deployment never change them.",
            "",
            *rows,
            "",
            "For example:",
            "",
            "```bash",
            f"export {env_var(example)}=...",
            "prefect worker start --pool my-managed-pool --type prefect:managed",
            "```",
            "",
            "or, in `prefect.toml`:",
            "",
            "```toml",
            f"[{TOML_TABLE}]",
            f'{example} = "..."',
            "```",
            "",
        ]
    )


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, SETTINGS_PAGE, content=render_settings_page()))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    known = {name.upper() for name in ManagedSettings.model_fields}
    for match in _ENV_MENTION.finditer(markdown):
        if match.group(1) not in known:
            log.warning(
                "%s names %s, which is not a setting of ManagedSettings (settings: %s)",
                page.file.src_uri,
                match.group(0),
                ", ".join(sorted(env_var(name) for name in ManagedSettings.model_fields)),
            )
    return markdown
