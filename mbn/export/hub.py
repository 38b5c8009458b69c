"""Upload an export folder to the Hugging Face Hub with huggingface_hub's own client.

The token is huggingface_hub's: ``HF_TOKEN`` or ``hf auth login``.
"""

from __future__ import annotations

from pathlib import Path

from mbn.errors import first_line
from mbn.export.trained import ExportError


def check_repo_id(repo_id: str) -> None:
    """A well-formed Hub repository id (``USER/NAME``), checked before anything is written.

    Raises:
        ExportError: a malformed id, in one line.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ExportError(f"--push-to-hub: {repo_id!r} is not a repository id (USER/NAME): {first_line(err)}") from None


def push_folder(folder: Path, repo_id: str, *, private: bool = False, commit_message: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload every file of ``folder``; returns the repository's URL.

    Raises:
        ExportError: a malformed repository id, or the Hub refused (no network, no token, no rights), in one line.
    """
    from huggingface_hub import HfApi

    import mbn

    check_repo_id(repo_id)

    api = HfApi(library_name="mbn-advprop", library_version=mbn.__version__)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.repo_info(url.repo_id).private:  # create_repo leaves an existing repo's visibility
            raise ExportError(
                f"--push-to-hub {repo_id}: the repository exists and is public, and --private does not change that; "
                "nothing was uploaded (make it private on the Hub first, or drop --private)"
            )
        api.upload_folder(
            repo_id=url.repo_id,
            folder_path=str(folder),
            commit_message=commit_message or f"Add {folder.name} (mbn-export)",
        )
    except ExportError:
        raise
    except Exception as err:  # requests / huggingface_hub errors: offline, 401, 403
        raise ExportError(f"--push-to-hub {repo_id}: upload failed ({type(err).__name__}: {first_line(err)}); the "
                          f"folder {folder} is complete, push it again later") from None  # fmt: skip
    return str(url)
