"""The section a storage format of surgery's own keeps in config.json (beside the original config under
`base_config`), read the same way for every such format: a missing or foreign section is one line."""

from __future__ import annotations

from typing import Any

from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError


def own_section(checkpoint: Checkpoint, section: str, version: int, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the section, the base config) of a checkpoint in format `kind`, checked for its format version."""
    where = checkpoint.path / "config.json"
    try:
        body, base = checkpoint.config[section], checkpoint.config["base_config"]
        found = body["format_version"]
    except (KeyError, TypeError) as e:
        raise SurgeryError(f"{where}: not a valid {kind} config (bad or missing {e})") from None
    if found != version:
        raise SurgeryError(f"{where}: {kind} format version {found} is not supported (this surgery reads {version}); "
                           "upgrade surgery")
    return body, base
