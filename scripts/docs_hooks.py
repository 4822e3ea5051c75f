"""mkdocs hooks: pages generated from the code, so that the docs cannot drift from it.

- ``settings.md`` is rendered from the pydantic model ``ManagedSettings`` at build time
  (field, environment variable, type, default, description); it is not committed.
- ``policy-reference.md`` is rendered from the policy file's pydantic models
  (``Workspace``, ``Tier``, ``Runtime``) and the built-in tiers (``BUILTIN_TIERS`` over
  ``Tier``'s defaults) at build time; it is not committed either.
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

import annotated_types
from mkdocs.structure.files import File, Files
from pydantic import AfterValidator, BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from prefect_managed.policy import (
    BUILTIN_TIERS,
    Host,
    Runtime,
    Tier,
    Workspace,
    format_bytes,
    format_seconds,
)
from prefect_managed.settings import ManagedSettings

log = logging.getLogger("mkdocs.hooks.prefect_managed")

SETTINGS_PAGE = "settings.md"
POLICY_PAGE = "policy-reference.md"
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
    if origin is typing.Literal:
        return " | ".join(f'"{arg}"' if isinstance(arg, str) else repr(arg) for arg in args)
    if origin is typing.Annotated:  # a constrained type: its base type
        return type_name(args[0])
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


def _code(text: str) -> str:
    """Code in a table cell: a `|` inside backticks does not split cells, and must not be
    escaped (the backslash would show)."""
    return f"`{' '.join(text.split())}`"


def render_settings_page() -> str:
    rows = [
        "| Setting | Environment variable | Type | Default | Description |",
        "|---|---|---|---|---|",
    ]
    for name, field in ManagedSettings.model_fields.items():
        rows.append(
            f"| `{name}` | `{env_var(name)}` | {_code(type_name(field.annotation))} "
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


def constraints_text(field: FieldInfo) -> str:
    """What a policy field's value must be, from the field's pydantic metadata."""
    notes = []
    for item in field.metadata:
        if isinstance(item, annotated_types.Gt):
            notes.append(f"more than {item.gt}")
        elif isinstance(item, annotated_types.Ge):
            notes.append(f"at least {item.ge}")
        elif getattr(item, "pattern", None):
            notes.append(f"matches `{item.pattern}`")
        elif isinstance(item, AfterValidator):
            # The only custom validator of the policy models: a size in Docker's units.
            notes.append("a size in Docker's units (`512m`, `2g`) or bytes, more than zero")
    return "; ".join(notes)


def toml_literal(value: Any) -> str:
    """A default as it would be written in the policy file: `"2g"`, `1`, `false`, `[...]`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}" if value == int(value) else repr(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(item) for item in value) + "]"
    return str(value)


def policy_default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return f"`{toml_literal(field.default_factory())}`"  # type: ignore[call-arg]
    if field.default is None:
        return "unset"
    return f"`{toml_literal(field.default)}`"


def _policy_table(model: type[BaseModel]) -> list[str]:
    rows = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        kind = _code(type_name(field.annotation))
        constraints = constraints_text(field)
        if constraints:
            kind += f" ({constraints})"
        rows.append(
            f"| `{name}` | {kind} | {policy_default_text(field)} "
            f"| {_cell(field.description or '')} |"
        )
    return rows


def builtin_tiers() -> dict[str, Tier]:
    """The built-in tiers as a workspace gets them: `BUILTIN_TIERS` over `Tier`'s defaults."""
    return {name: Tier(**values) for name, values in BUILTIN_TIERS.items()}


def _builtin_tiers_table() -> list[str]:
    tiers = builtin_tiers()
    rows = [
        "| Key | " + " | ".join(f"`{name}`" for name in tiers) + " |",
        "|---|" + "---:|" * len(tiers),
    ]
    readable = {
        "memory": lambda tier: format_bytes(tier.memory_bytes),
        "max_run_seconds": lambda tier: format_seconds(tier.max_run_seconds),
    }
    for name in Tier.model_fields:
        cells = []
        for tier in tiers.values():
            cell = f"`{toml_literal(getattr(tier, name))}`"
            if name in readable:
                cell += f" ({readable[name](tier)})"
            cells.append(cell)
        rows.append(f"| `{name}` | {' | '.join(cells)} |")
    return rows


def render_policy_page() -> str:
    return "\n".join(
        [
            "# Policy file reference",
            "",
            "<!-- Generated from the pydantic models of prefect_managed.policy by "
            "scripts/docs_hooks.py at build time; edit the models' field descriptions, not "
            "this page. -->",
            "",
            "The policy file is TOML with four tables. Every table and every key is "
            "optional; a key that is not listed here, a value of the wrong type, a limit "
            "of zero or less, or a workspace tier that is not defined makes the file "
            "unusable: `prefect-managed policy check` and the worker print one `Error:` "
            "line naming the file, the key and the problem. Where the worker finds the "
            "file, and a complete example, are in the "
            "[operator guide](operator-guide.md#the-policy-file).",
            "",
            "## `[workspace]`",
            "",
            "Which workspace the worker serves and the tier it is on.",
            "",
            *_policy_table(Workspace),
            "",
            "## `[tiers.<name>]`",
            "",
            "One table per tier. A table named after a built-in tier (`"
            + "`, `".join(BUILTIN_TIERS)
            + "`) changes only the keys it sets; a table with another name defines a new "
            "tier, whose unset keys take the defaults below (the free tier's numbers).",
            "",
            *_policy_table(Tier),
            "",
            "### Built-in tiers",
            "",
            "Every policy has these tiers, before the file's own `[tiers.<name>]` tables "
            "are applied:",
            "",
            *_builtin_tiers_table(),
            "",
            "## `[runtime]`",
            "",
            f"{_cell(Runtime.__doc__ or '')} The default image must match one of "
            "`allowed_images`.",
            "",
            *_policy_table(Runtime),
            "",
            "## `[host]`",
            "",
            f"{_cell(Host.__doc__ or '')} See [scale-out](scale-out.md#room-on-a-host).",
            "",
            *_policy_table(Host),
            "",
        ]
    )


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, SETTINGS_PAGE, content=render_settings_page()))
    files.append(File.generated(config, POLICY_PAGE, content=render_policy_page()))
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
