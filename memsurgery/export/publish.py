"""`export --push-to-hub REPO`: upload a finished export directory to the Hugging Face Hub.

The directory is complete and verified before anything is uploaded (export writes it
atomically first); the upload is one commit of every file, SHA256SUMS included, through
`huggingface_hub.HfApi` (its token: HF_TOKEN or `hf auth login`).
"""

from __future__ import annotations

from pathlib import Path

from memsurgery.errors import InputError, RuntimeFailure

_REPO = r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$"


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                log=lambda msg: None) -> dict:
    """Create `repo_id` if needed and upload `folder` as one commit; {repo, url, commit, files}."""
    import re

    from huggingface_hub import HfApi
    from huggingface_hub import errors as E

    from memsurgery.checkpoint.hub import hub_offline

    if not re.match(_REPO, repo_id or ""):
        raise InputError(f"--push-to-hub {repo_id!r}: expected a repository id owner/name")
    if hub_offline():
        raise InputError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset it to upload "
                         f"(the export itself is complete in {folder})")
    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    api = HfApi(token=token)
    log(f"uploading {len(files)} files to {repo_id}")
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                   commit_message=f"memsurgery export: {folder.name}")
    except E.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise InputError(f"--push-to-hub {repo_id}: not allowed ({status}); log in with a write token "
                             f"(hf auth login or HF_TOKEN); the export is complete in {folder}") from None
        raise RuntimeFailure(f"--push-to-hub {repo_id}: upload failed ({type(err).__name__}: {err}); the export "
                             f"is complete in {folder}, retry the upload") from None
    except (OSError, ValueError) as err:
        raise RuntimeFailure(f"--push-to-hub {repo_id}: upload failed ({type(err).__name__}: {err}); the export "
                             f"is complete in {folder}, retry the upload") from None
    return {"repo": repo_id, "url": str(url), "commit": getattr(commit, "oid", None) or str(commit),
            "files": len(files), "private": private}
