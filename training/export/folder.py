"""Where an export is written, safely, and what goes in beside the weights (tokenizer, chat
template, generation config). `zerotune export --out DIR` and RUN_DIR/final never delete what
zerotune did not write there.

    check_out(out, run_dir, force)        # before any work: refuse a folder that is not ours to replace
    tmp = fresh_tmp(out)                  # a new hidden folder beside `out` (never an existing one)
    ... write the model into tmp ...
    finish(tmp, run_dir, checkpoint, what)  # config.json use_cache on, marker, normal permissions
    replace_dir(tmp, out)                 # swap in; the previous export (if any) goes

Every export carries EXPORT_MARKER (`.zerotune-export.json`: the run folder and checkpoint it came
from). An existing non-empty --out is replaced only when it is an export of the same run, or the
run's own final/, or with --force; never the run folder, a folder above it, a folder inside it
other than final/, or the working directory (or a folder above it), even with --force.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from zerotune.core.errors import UserError
from zerotune.core.io import usual_mode
from zerotune.core.layout import EXPORT_MARKER, FINAL_DIR




class ExportError(UserError, RuntimeError):
    """An export that cannot be written (missing checkpoint, refused output folder)."""


def export_of(folder: Path) -> str | None:
    """The run folder an export came from (None: not a zerotune export)."""
    try:
        return json.loads((folder / EXPORT_MARKER).read_text()).get("run_dir")
    except (OSError, ValueError, AttributeError):
        return None


def check_out(out: Path, run_dir: Path, force: bool = False) -> None:
    """One line, before anything is written, when `out` may not be replaced by an export of `run_dir`."""
    o, r, cwd = Path(out).resolve(), Path(run_dir).resolve(), Path.cwd().resolve()
    instead = f"choose a new folder (e.g. exported/{r.name})"
    if o == r:
        raise ExportError(f"--out {out} is the run folder itself: exporting there would delete its checkpoints; "
                          f"{instead}")
    if o in r.parents:
        raise ExportError(f"--out {out} holds the run folder {run_dir}: exporting there would delete it; {instead}")
    if r in o.parents and o != r / FINAL_DIR:
        raise ExportError(f"--out {out} is inside the run folder {run_dir}, where only {FINAL_DIR}/ may be written; "
                          f"{instead}")
    if o == cwd or o in cwd.parents:
        raise ExportError(f"--out {out} is the working directory or holds it; {instead}")
    if force or not (o.exists() or o.is_symlink()) or o == r / FINAL_DIR:
        return
    if not o.is_dir():
        raise ExportError(f"--out {out} is a file; {instead}, or pass --force to replace it")
    if not any(o.iterdir()):
        return
    source = export_of(o)
    if source == str(r):
        return
    if source is not None:
        raise ExportError(f"--out {out} is an export of another run ({source}); {instead}, "
                          "or pass --force to replace it")
    raise ExportError(f"--out {out} is not empty and is not an export of {run_dir} (it has no {EXPORT_MARKER}); "
                      f"{instead}, or pass --force to replace it")


# ----------------------------------------------------------------------------- what goes in beside the weights
def base_model_id(recipe) -> str:
    """recipe.model.path as an adapter's base: absolute when it is a local folder."""
    p = Path(recipe.model.path).expanduser()
    return str(p.resolve()) if p.is_dir() else recipe.model.path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model")


def copy_tokenizer(recipe, out: Path) -> None:
    """The run's tokenizer files, copied as they are (transformers 5 does not round-trip every
    tokenizer through save_pretrained: stories260K's loses its leading-space rule), plus the
    chat template the run trained with (model.chat_template) in tokenizer_config.json."""
    src = Path(recipe.model.tokenizer or recipe.model.path).expanduser()
    if not src.is_dir():  # a hub id: its files from the local cache (or the hub)
        from huggingface_hub import snapshot_download
        src = Path(snapshot_download(recipe.model.tokenizer or recipe.model.path, allow_patterns=list(TOKENIZER_FILES)))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    if recipe.model.chat_template is not None:
        from zerotune.training.data.tokenize import resolve_template
        from zerotune.training.data.build import load_tokenizer
        template = resolve_template(load_tokenizer(recipe), recipe.model.chat_template)
        config = json.loads((out / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (out / "chat_template.jinja").write_text(template)


def save_side_files(recipe, out: Path) -> None:
    """Tokenizer (with the run's chat template) and generation config next to the weights."""
    from transformers import GenerationConfig
    copy_tokenizer(recipe, out)
    if not (out / "generation_config.json").is_file():
        try:
            gen = GenerationConfig.from_pretrained(recipe.model.path)
        except OSError:
            from transformers import AutoConfig
            gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(recipe.model.path))
        gen.save_pretrained(out)


# ----------------------------------------------------------------------------- the folder
def fresh_tmp(out: Path) -> Path:
    """A new, empty hidden folder beside `out` (mkdtemp: never an existing one)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def _use_cache_on(config_file: Path) -> None:
    """Training turns the KV cache off (model.config.use_cache = False); an exported model is for
    inference: turn it back on."""
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    parts = [config] + [v for v in config.values() if isinstance(v, dict) and "use_cache" in v]
    if any(p.get("use_cache") is False for p in parts):
        for p in parts:
            if p.get("use_cache") is False:
                p["use_cache"] = True
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders and safetensors writes 0600 files: give them the modes any file
    gets, so an export can be shared like the rest of the disk."""
    for root, dirs, files in os.walk(folder):
        usual_mode(root)
        for name in files:
            usual_mode(os.path.join(root, name))


def finish(folder: Path, run_dir: Path, checkpoint: str, what: str) -> None:
    """The last touches of an export before it is swapped in: config, marker, permissions."""
    _use_cache_on(Path(folder) / "config.json")
    marker = {"run_dir": str(Path(run_dir).resolve()), "checkpoint": checkpoint, "content": what}
    (Path(folder) / EXPORT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    _normal_permissions(Path(folder))


def replace_dir(tmp: Path, out: Path) -> None:
    """Swap the finished `tmp` in as `out`; what was at `out` (checked by check_out) goes."""
    out = Path(out)
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, out)
