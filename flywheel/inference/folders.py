"""Model folders: a base model (a folder, or a Hugging Face hub id in the local cache) and LoRA adapters.

Nothing here downloads or loads weights. `resolve_base_model` turns a base-model reference into a checked
folder (`hub_origin` reads a cache snapshot's id and revision back); `check_adapter_folder` checks a PEFT
adapter folder; `model_config_hash` says which architecture and size a base model is.

Weights are read from safetensors only: a base folder with only `pytorch_model.bin` or an adapter folder with
only `adapter_model.bin` is refused, because loading those means unpickling.
"""

from __future__ import annotations

from pathlib import Path

from flywheel.errors import UserInputError
from flywheel.store.vectors import sha256_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_adapter_folder(path: Path | str, expected_sha256: str | None = None) -> Path:
    """The adapter folder if it holds safetensors weights (and they have the expected hash); otherwise a
    UserInputError. A `.bin` adapter would have to be unpickled, so it is refused."""
    folder = Path(path)
    weights = folder / ADAPTER_WEIGHTS
    if not (folder / "adapter_config.json").is_file():
        raise UserInputError(f"{folder}: not a PEFT adapter folder (no adapter_config.json)")
    if not weights.is_file():
        if (folder / "adapter_model.bin").exists():
            raise UserInputError(f"{folder}: adapter_model.bin is refused (pickle); save the adapter as {ADAPTER_WEIGHTS}")
        raise UserInputError(f"{folder}: no {ADAPTER_WEIGHTS}")
    if expected_sha256 is not None:
        actual = sha256_file(weights)
        if actual != expected_sha256:
            raise UserInputError(f"{weights}: sha256 {actual} does not match the recorded {expected_sha256}")
    return folder


def resolve_base_model(ref: Path | str) -> Path:
    """A base model given as a folder or as a Hugging Face hub id (`org/name`) -> its folder, checked by
    check_base_folder. A folder wins over an id of the same spelling.

    An id resolves offline, to the snapshot of the local Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub)
    that its `main` ref points at. Never downloaded: training machines may have no network, and a model
    that changed upstream would change what is trained without anyone deciding it. The snapshot folder
    (.../models--org--name/snapshots/<commit>) pins the revision; hub_origin() reads id and revision back."""
    text = str(ref)
    folder = Path(text).expanduser()
    if folder.is_dir():
        return check_base_folder(folder)
    if folder.exists():
        raise UserInputError(f"{text}: a file, not a model folder")
    if not _looks_like_hub_id(text):
        raise UserInputError(f"{text}: no such folder")
    return check_base_folder(_cached_snapshot(text))


def hub_origin(folder: Path | str) -> tuple[str, str] | None:
    """(hub id, revision) when `folder` is a snapshot in a Hugging Face cache, else None."""
    path = Path(folder)
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    # The cache spells org/name as models--org--name; a valid id never holds "--" itself.
    return repo.removeprefix("models--").replace("--", "/"), path.name


def is_hub_id(text: str) -> bool:
    """`org/name` as the hub spells it. An id without an org ("gpt2") is not taken for one: where a version
    or an alias may also be named ("v2", "champion"), that spelling means the registry."""
    return "/" in text and _looks_like_hub_id(text)


def _looks_like_hub_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:  # a path spelling (/x, ./x, ~/x, a/b/c) fails this: it is a missing folder, not an id
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _cached_snapshot(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise UserInputError(
            f"{repo_id}: neither a folder nor in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"download it with `hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`) "
            "and copy the cache here if this machine has no network, or pass a model folder"
        ) from None


def check_base_folder(path: Path | str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserInputError(f"{folder}: not a model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise UserInputError(f"{folder}: only pickled weights (.bin/.pt) found; flywheel loads safetensors only")
        raise UserInputError(f"{folder}: no .safetensors weights")
    return folder


def model_config_hash(base_path: Path | str) -> str:
    """sha256 of a model folder's config.json: which architecture and size a base model is."""
    config = Path(base_path) / "config.json"
    if not config.is_file():
        raise UserInputError(f"{base_path}: not a model folder (no config.json)")
    return sha256_file(config)
