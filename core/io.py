"""Small torch-free file helpers both sides share: one atomic write, one size parser, one
reader of a model's config.json, the rules for telling a local path from a hub id, and whether a
process of this host exists."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import RecipeError

GIB = 2 ** 30


def atomic_write(path: Path, text: str, executable: bool = False) -> None:
    """Write-to-temp, fsync, rename, fsync the folder: the file is either old or new, never torn."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if executable:
        tmp.chmod(tmp.stat().st_mode | 0o110)   # u+x, g+x
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """This process's umask, read without setting it (os.umask sets it: a race with other threads
    creating files, such as the background checkpoint writer)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(path: Path) -> None:
    """Give a file or folder the mode it would get from open()/mkdir() (0666 / 0777 less the
    umask): safetensors writes 0600 files and mkdtemp 0700 folders."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask())


def process_exists(pid: int) -> bool:
    """A process with that pid exists on this host (perhaps another user's, perhaps a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parse_size(text: str) -> float:
    """'80GB', '80G', '80GiB', '512 GB', '1.5T', '500MB' -> bytes. K/M/G/T count in powers of 1024
    whether or not an 'i' is written (as nvidia-smi and `free` mean GB); a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise RecipeError(f"{text!r} is not a memory size like 80GB, 512G or 500MB")
    return float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper())


# Hub ids: `gpt2` or `org/name` (one slash at most, no leading `.`, `~` or `/`, no `..` or `--`).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_hub_id(value: str) -> bool:
    """True for what the Hugging Face hub accepts as a repo id; `./x`, `a/b/c`, `/abs`, `~/x` are local."""
    return bool(_HUB_ID.match(value)) and ".." not in value and "--" not in value


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1 (or true/yes/on): look only in the local Hugging Face cache."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_file(repo_id: str, filename: str, repo_type: str = "model") -> Path:
    """A file of a hub repo: from the local cache, else downloaded. With HF_HUB_OFFLINE=1 only the
    cache is read (no network, no retries). Raises RecipeError whose message is the reason only."""
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    if isinstance(cached, str):
        return Path(cached)
    if hub_offline():
        raise RecipeError("HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache")
    import logging
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)   # no "Retrying in 4s" lines between the command and its one-line error
    try:
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type))
    except Exception as e:  # offline, private, misspelt
        text = str(e).strip()
        raise RecipeError(text.splitlines()[0][:160] if text else type(e).__name__) from None
    finally:
        hub_log.setLevel(level)


def read_model_config(model_path: str, key: str = "model.path") -> dict:
    """A model's config.json from its local folder, or from the Hugging Face hub cache/download.
    `key` names the recipe key in the error."""
    path = Path(model_path).expanduser()
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if path.exists() or not looks_like_hub_id(model_path):
        raise RecipeError(f"{key}: {model_path!r} has no config.json")
    try:
        return json.loads(hub_file(model_path, "config.json").read_text())
    except RecipeError as e:
        raise RecipeError(f"{key}: cannot read config.json of {model_path!r} ({e})") from None
