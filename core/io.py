"""Small torch-free file helpers both sides share: one atomic write, one size parser, one
reader of a model's config.json."""
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


def parse_size(text: str) -> float:
    """'80GB', '80G', '80GiB', '512 GB', '1.5T', '500MB' -> bytes. K/M/G/T count in powers of 1024
    whether or not an 'i' is written (as nvidia-smi and `free` mean GB); a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise RecipeError(f"{text!r} is not a memory size like 80GB, 512G or 500MB")
    return float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper())


def read_model_config(model_path: str, key: str = "model.path") -> dict:
    """A model's config.json from its local folder, or from the Hugging Face hub cache/download.
    `key` names the recipe key in the error."""
    path = Path(model_path).expanduser()
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if path.is_absolute() or model_path.startswith((".", "~")) or path.exists():
        raise RecipeError(f"{key}: {model_path!r} has no config.json")
    try:
        from huggingface_hub import hf_hub_download
        return json.loads(Path(hf_hub_download(model_path, "config.json")).read_text())
    except Exception as e:
        raise RecipeError(f"{key}: cannot read config.json of {model_path!r} ({type(e).__name__})") from None
