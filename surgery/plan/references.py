"""Model references, in plans and on the command line: folders (relative to the plan, or to the
current folder), `demo:NAME` demo models, and Hugging Face Hub ids (`org/name`, `org/name@revision`)
resolved through huggingface_hub: its cache first, a download only when it is not offline.

A local folder always wins over a Hub id of the same spelling, so an existing plan never changes
meaning.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError

DEMO_SCHEME = "demo:"
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
# A folder huggingface_hub downloaded: .../models--ORG--NAME/snapshots/COMMIT
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})(?:/|$)")
# What a model needs, and nothing it could run: no *.py (remote code), no pickle, no other formats.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.md"]


@dataclass(frozen=True)
class HubOrigin:
    """Where a folder came from on the Hub: its repo id and the exact commit."""

    repo: str
    commit: str


def resolve_model_path(ref: str, base_dir: Path) -> Path:
    """A model reference to a folder: paths are relative to `base_dir`; `demo:NAME` is a demo model;
    `org/name[@revision]`, where no such folder exists, a Hub snapshot."""
    if ref.startswith(DEMO_SCHEME):
        from surgery.demo_models import demo_model

        return demo_model(ref.removeprefix(DEMO_SCHEME), log=lambda line: print(line, file=sys.stderr))
    path = expand_user(ref)
    local = path if path.is_absolute() else (base_dir / path)
    match = HUB_ID.match(ref)
    if match is None or local.exists() or local.is_symlink():
        return local
    try:
        return hub_snapshot(match["repo"], match["revision"])
    except SurgeryError as e:  # it may have been meant as a folder: say where that was looked for
        raise SurgeryError(f"{ref}: no folder {local}; as a Hub id, {e}") from None


def hub_snapshot(repo: str, revision: str | None) -> Path:
    """The cached snapshot of a Hub repo at `revision` (default: main), downloaded when it is not
    cached and huggingface_hub is not offline; otherwise one line with the command that fetches it."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    name = repo + (f"@{revision}" if revision else "")
    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=DOWNLOAD_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not cached: download, where allowed
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise SurgeryError(f"{name}: cannot read it from the Hugging Face cache ({type(e).__name__}); run `{fetch}`") from None
    if constants.HF_HUB_OFFLINE or _offline_now():
        raise SurgeryError(f"{name} is not in the Hugging Face cache, and downloads are off (HF_HUB_OFFLINE); run "
                           f"`{fetch}` where the network allows, or name a local folder")
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise SurgeryError(f"{name}: the Hub answered HTTP {status} (no such repo or revision, or it is gated: "
                           f"`hf auth login`); check the id, or run `{fetch}`") from None
    except (OSError, ValueError) as e:
        raise SurgeryError(f"{name}: cannot download it ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                           f"run `{fetch}` where the network allows, or name a local folder") from None


def _offline_now() -> bool:
    """HF_HUB_OFFLINE as the environment says it now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_origin(path: str | Path) -> HubOrigin | None:
    """The repo and commit of a folder inside the Hugging Face cache, else None."""
    match = _SNAPSHOT.search(str(Path(path).resolve()).replace("\\", "/") + "/")
    return HubOrigin(f"{match['org']}/{match['name']}", match["commit"]) if match else None


def expand_user(ref: str) -> Path:
    """`~` and `~user` expanded; a user the system does not know is one line, not a traceback."""
    try:
        return Path(ref).expanduser()
    except RuntimeError:
        raise SurgeryError(f"{ref}: cannot expand {ref.split('/')[0]} (no such user, or no home folder); "
                           "write the path out in full") from None
