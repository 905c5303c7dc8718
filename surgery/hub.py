"""Push an output folder to the Hugging Face Hub with huggingface_hub: create the repo (and branch)
if needed, have the Hub validate the card's metadata, upload the folder, return the commit URL.

The token is huggingface_hub's own resolution (HF_TOKEN, then `hf auth login`'s file). It is passed
to the library and never printed, logged or written; errors are rebuilt from status codes and
server messages, never from request headers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.checkpoint.reader import read_config
from surgery.errors import SurgeryError
from surgery.formats.ensemble_folder import is_ensemble
from surgery.output.card import CARD_NAME, model_card
from surgery.output.provenance import PROVENANCE_NAME, read_provenance

WEIGHT_SUFFIXES = (".safetensors",)
# Above this, huggingface_hub 1.x's resumable `upload_large_folder` (many commits, resumed where it
# stopped) takes the folder. In 2.x `upload_folder` is that path itself (streamed, batched into
# several commits, resumed by re-running), and 1.x has no other, so it serves below the threshold.
LARGE_FOLDER_BYTES = 20 << 30


@dataclass(frozen=True)
class PushResult:
    repo: str
    url: str  # the commit, or the pull request with create_pr
    files: int
    bytes: int


def upload_list(folder: Path, allow_failed_gates: bool = False) -> list[tuple[str, int]]:
    """The files that go up (relative path, size), after checking the folder is a surgery output that met its
    plan's quality gates (or `allow_failed_gates`)."""
    if not folder.is_dir():
        raise SurgeryError(f"{folder} does not exist or is not a folder")
    if not (folder / PROVENANCE_NAME).is_file() or not (folder / "config.json").is_file():
        raise SurgeryError(f"{folder} is not a surgery output (no {PROVENANCE_NAME} or config.json); "
                           "push folders written by `surgery apply`")
    gates = (read_provenance(folder) or {}).get("quality_gates")
    if isinstance(gates, dict) and gates.get("passed") is False and not allow_failed_gates:
        missed = "; ".join(str(m) for m in gates.get("missed", []))
        raise SurgeryError(f"{folder} missed its plan's quality gates ({missed}); pass --allow-failed-gates to push it "
                           "anyway (its card says so)")
    links = sorted(p for p in folder.rglob("*") if p.is_symlink())
    if links:
        raise SurgeryError(f"{links[0]} is a link; surgery never writes links into an output, so this one was put "
                           "there: remove it (nothing is uploaded through a link)")
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files) and not is_ensemble(read_config(folder)):
        raise SurgeryError(f"{folder} holds no weights (*.safetensors); nothing worth pushing")
    if not (folder / CARD_NAME).is_file():
        raise SurgeryError(f"{folder} has no {CARD_NAME} (model card); re-run `surgery apply` to write one")
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in files]


def push(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, create_pr: bool = False, allow_failed_gates: bool = False) -> PushResult:
    """Create the repo and branch if needed, validate the card, upload the folder."""
    from huggingface_hub import HfApi

    files = upload_list(folder, allow_failed_gates)
    token = ready_to_push(repo_id)
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    message = commit_message or f"surgery: upload {folder.name}"
    with _http_errors(api.endpoint, repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        card = hub_card(folder, repo_id)
        validate_card(api, card, token)
        total = sum(size for _, size in files)
        others = [name for name, _ in files if name != CARD_NAME]
        large_folder = getattr(api, "upload_large_folder", None)
        if total > LARGE_FOLDER_BYTES and large_folder is not None and not create_pr:
            large_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision, private=private,
                         print_report=False, allow_patterns=others)
            api.upload_file(path_or_fileobj=card.encode(), path_in_repo=CARD_NAME, repo_id=repo_id, revision=revision,
                            commit_message=f"{message}: model card")
            url = f"{api.endpoint}/{repo_id}/tree/{revision or 'main'}"
        else:
            from huggingface_hub import CommitOperationAdd

            operations = [CommitOperationAdd(name, str(folder / name)) for name in others]
            operations.append(CommitOperationAdd(CARD_NAME, card.encode()))
            info = api.create_commit(repo_id, operations, commit_message=message, revision=revision,
                                     create_pr=create_pr)
            url = info.pr_url or info.commit_url
    return PushResult(repo_id, url, len(files), total)


def hub_card(folder: Path, repo_id: str) -> str:
    """The folder's card as the Hub shows it: titled by the repo, its how-to-load naming the repo id
    (the card in the folder names the folder's own path)."""
    return model_card(read_provenance(folder) or {}, read_config(folder), repo_id.split("/")[-1], repo_id)


def ready_to_push(repo_id: str) -> str:
    """The token, after checking the repo id; checked before a long apply too, so it fails early."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise SurgeryError(f"invalid repo id {repo_id!r}: {str(e).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise SurgeryError(f"invalid repo id {repo_id!r}: write it as OWNER/NAME")
    token = get_token()
    if not token:
        raise SurgeryError("no Hugging Face token: run `hf auth login`, or set HF_TOKEN to a token with write access")
    return token


def validate_card(api: object, card: str, token: str) -> None:
    """The Hub's own check of the card's YAML metadata (what ModelCard.validate does, on this endpoint)."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    response = get_session().post(f"{api.endpoint}/api/validate-yaml",  # type: ignore[attr-defined]
                                  json={"content": card, "repoType": "model"}, headers=build_hf_headers(token=token))
    hf_raise_for_status(response)


@contextmanager
def _http_errors(endpoint: str, repo_id: str) -> Iterator[None]:
    """One line per failure: the status and the server's message, or the endpoint that could not be reached."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except Exception as raised:
        error = _cause(raised, HfHubHTTPError)  # an LFS upload's failure comes wrapped in a RuntimeError
        if error is not None:
            status = error.response.status_code if error.response is not None else "?"
            hint = {401: " (is the token valid? `hf auth login`)", 403: " (does the token have write access there?)",
                    413: " (the server refused a file this large)"}
            detail = (error.server_message or "").strip().splitlines()
            raise SurgeryError(f"push to {repo_id} failed: HTTP {status}{hint.get(status, '')}"
                               + (f": {detail[0]}" if detail else "")) from None
        lost = _cause(raised, OSError) or next((e for e in _chain(raised) if "Connect" in type(e).__name__
                                                or "Timeout" in type(e).__name__), None)
        if lost is not None:
            raise SurgeryError(f"push to {repo_id} failed: cannot reach {endpoint} ({type(lost).__name__}: {lost})") from None
        raise


def _chain(error: BaseException) -> Iterator[BaseException]:
    """The error and the ones it was raised from, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _cause(error: BaseException, kind: type[BaseException]) -> Any:
    return next((e for e in _chain(error) if isinstance(e, kind)), None)
