"""``lora-lab-export ... --push-to-hub REPO``: an exported adapter folder uploaded to a Hugging Face Hub
model repository (created when missing), with the token huggingface_hub finds (``HF_TOKEN`` in the
environment, else the one ``hf auth login`` stored). ``--dry-run`` lists what would be uploaded and
contacts nothing."""
from __future__ import annotations

from pathlib import Path

from lora_lab.errors import ConfigError, first_line


class PushError(Exception):
    """The upload failed (no network, no or a wrong token, no rights on the repository)."""


def upload_plan(folder, files) -> list[tuple[str, int]]:
    """The files of ``folder`` that go up, with their sizes in bytes."""
    return [(name, (Path(folder) / name).stat().st_size) for name in files]


def check_repo_id(repo: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as error:
        raise ConfigError("--push-to-hub", repo, f"is not a Hub repository id: {first_line(error)}") from None
    if "/" not in repo:
        raise ConfigError("--push-to-hub", repo, "needs the owner: OWNER/NAME")


def describe_plan(repo: str, private: bool, plan: list[tuple[str, int]]) -> str:
    lines = [f"[lora_lab] dry run: would upload to https://huggingface.co/{repo} "
             f"({'private' if private else 'public'} model repository, created if missing):"]
    lines += [f"  {name}  {size:,} bytes" for name, size in plan]
    lines.append(f"  {len(plan)} files, {sum(size for _, size in plan):,} bytes in all")
    return "\n".join(lines)


def push(folder, files, repo: str, private: bool) -> str:
    """Create ``repo`` (if missing) and upload ``files`` of ``folder`` in one commit; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()  # token=None: HF_TOKEN from the environment, else the stored login
    try:
        api.create_repo(repo, private=private, repo_type="model", exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=str(folder), allow_patterns=list(files),
                                   repo_type="model", commit_message="Upload adapter exported by lora_lab")
    except Exception as error:  # noqa: BLE001 - network, HTTP and token errors come in many types
        raise PushError(f"push to {repo} failed: {type(error).__name__}: {first_line(error)}") from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo}")
