"""Upload a finished export to the Hugging Face hub (``mlxft export ... --push REPO_ID``).

The token and the hub are checked before the export starts, so offline (or without a
token) the command stops with one message and writes nothing. The upload itself is one
commit of the whole folder: the repository gets all of it or none of it.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, get_token

from mlxft.export.check import ExportError


def check_hub_access(repo_id: str) -> None:
    """Raise ExportError unless a token exists and the hub answers for it."""
    if repo_id.count("/") != 1:
        raise ExportError(f"--push {repo_id!r}: give a repo id as owner/name")
    token = get_token()
    if not token:
        raise ExportError("--push needs a Hugging Face token (run `hf auth login` or set HF_TOKEN); nothing was written")
    try:
        HfApi().whoami(token=token)
    except Exception as e:  # offline, DNS, proxy, expired token: all mean "cannot push now"
        raise ExportError(f"--push: the Hugging Face hub cannot be reached with this token "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                          "nothing was written") from None


def push_folder(folder: Path, repo_id: str, message: str) -> str:
    """Create the model repo when needed and upload ``folder`` as one commit; returns its URL."""
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    except Exception as e:
        raise ExportError(f"the export in {folder} is complete, but the upload to {repo_id} failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                          "nothing was committed there; rerun with a fresh OUT to retry") from None
    return getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
