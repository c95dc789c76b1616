"""Reading a recipe: YAML file -> overrides (`--set a.b=value`) -> validated Recipe -> local
paths made absolute, with every error as one line naming the file (or the --set) and key.

Relative paths in a recipe (model.path, model.tokenizer, data.train/eval[*].path, and
model.chat_template when it names a template file) resolve against the recipe file's folder
when they exist there, else against the working directory; a value given with --set tries the
working directory first. The resolved recipe (RUN_DIR/recipe.yaml) holds absolute paths, so
ranks and requeued jobs do not depend on the working directory. A template file's text is read
into model.chat_template. A value that cannot be a hub id (`./x`, `../x`, `/x`, `~/x`, `a/b/c`,
a data file name such as `chats.jsonl`) and exists nowhere is an error naming the folders tried;
anything else that is not found locally is left for the hub (launcher/prepare.py checks it).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from .errors import RecipeError
from .io import looks_like_hub_id
from .layout import RECIPE_FILE

if TYPE_CHECKING:
    from .recipe import Recipe

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")     # as training/data/sources.py reads
TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".txt")
_YAML_BOOL_WORDS = ("y", "yes", "n", "no", "on", "off")     # YAML 1.1 reads these unquoted as booleans


# ----------------------------------------------------------------------------- error lines
def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith(("literal[", "function-"))))


def _submodel(annotation) -> Optional[type[BaseModel]]:
    """The pydantic model inside an annotation (Model, Optional[Model], list[Model], ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _model_at(model: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The model class that holds the last key of `loc`."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        sub = _submodel(field.annotation) if field is not None else None
        if sub is None:
            return None
        model = sub
    return model


def _null_message(err: dict) -> str:
    from .recipe import Recipe
    holder = _model_at(Recipe, err["loc"])
    field = holder.model_fields.get(err["loc"][-1]) if holder and isinstance(err["loc"][-1], str) else None
    if field is None or field.is_required():
        return "must not be null (a required key)"
    if field.default is not PydanticUndefined and field.default is not None:
        return f"must not be null (leave the key out for the default, {field.default!r})"
    return "must not be null (leave the key out for the default)"


def _scalar_hint(inp: Any, key: Optional[str], raw: Optional[str]) -> str:
    """A string key that YAML read as a boolean or a number: say so, and how to quote it."""
    what = f"the boolean {str(inp).lower()}" if isinstance(inp, bool) else f"the number {inp!r}"
    if key is not None and raw is not None:
        return f"expects text, but YAML reads {raw.strip()} as {what}; quote it: --set \"{key}='{raw.strip()}'\""
    words = " (unquoted yes/no/on/off are booleans in YAML)" if isinstance(inp, bool) else ""
    return f"expects text, but YAML read the value as {what}{words}; quote it"


def _message(err: dict, key: Optional[str], raw: Optional[str]) -> str:
    kind, ctx, inp = err["type"], err.get("ctx") or {}, err.get("input")
    if inp is None and kind != "missing" and err["loc"]:
        return _null_message(err)
    if kind == "string_type" and isinstance(inp, (bool, int, float)):
        return _scalar_hint(inp, key, raw)
    if kind == "literal_error":
        allowed = ", ".join(a or b for a, b in re.findall(r"'([^']*)'|\b(\d+)\b", ctx.get("expected", "")))
        return f"{inp!r} is not one of {allowed}"
    if kind == "extra_forbidden":
        from .recipe import Recipe
        holder = _model_at(Recipe, err["loc"])
        return "unknown key" + (f" (allowed: {', '.join(holder.model_fields)})" if holder else "")
    if kind == "missing":
        return "required key is missing"
    return err["msg"].removeprefix("Value error, ")


def _blamed_override(loc: str, kind: str, overrides: dict[str, str]) -> Optional[str]:
    """The --set key an error belongs to: the key itself or a key under it, or, for an unknown
    key, a section the --set created."""
    for key in reversed(list(overrides)):
        if loc == key or loc.startswith(key + ".") or (kind == "extra_forbidden" and key.startswith(loc + ".")):
            return key
    return None


def _format_error(err: dict, source: str, overrides: dict[str, str]) -> str:
    loc = _loc(err)
    key = _blamed_override(loc, err["type"], overrides) if loc else None
    msg = _message(err, key if key == loc else None, overrides.get(key) if key == loc else None)
    if key is not None:
        return f"--set {key}: {msg}" if key == loc else f"--set {key}: {loc}: {msg}"
    return f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}"


def _merge_union_errors(errors: list[dict]) -> list[dict]:
    """A Union field yields one error per branch; keep one line per key."""
    seen, out = set(), []
    for e in errors:
        key = _loc(e)
        if key in seen:
            continue
        seen.add(key)
        out.append(e)
    return out


def validate_recipe(data: Any, source: str = "recipe", overrides: Optional[dict[str, str]] = None) -> Recipe:
    """dict -> Recipe. `overrides` ({dotted key: raw value} of --set) makes errors on those keys
    name the --set instead of the file."""
    from .recipe import Recipe
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = [_format_error(err, source, overrides or {}) for err in _merge_union_errors(e.errors())]
        raise RecipeError("\n".join(lines)) from None


# ----------------------------------------------------------------------------- reading, --set
def apply_override(data: dict, assignment: str) -> tuple[str, str]:
    """`a.b.c=value`: value parsed as YAML; creates missing sections; a number indexes a list
    (`data.train.0.path=x`). Returns (dotted key, raw value)."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise RecipeError(f"--set {assignment!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {key}: value {raw!r} is not valid YAML ({e.problem})") from None
    node = data
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if not isinstance(node, (dict, list)):
            raise RecipeError(f"--set {key}: {'.'.join(parts[:i])!r} is not a section")
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise RecipeError(f"--set {key}: {'.'.join(parts[:i]) or key} has {len(node)} item(s); "
                                  f"{p!r} is not one of their indexes (0-{len(node) - 1})")
            p = int(p)
        elif not isinstance(node.get(p), (dict, list)) and not last:
            if p in node and node[p] is not None:
                raise RecipeError(f"--set {key}: {'.'.join(parts[:i + 1])!r} is not a section")
            node[p] = {}
        if last:
            node[p] = value
        else:
            node = node[p]
    return key, raw


def read_recipe_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{p}:{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    return data if data is not None else {}


# ----------------------------------------------------------------------------- paths
def path_candidates(value: str, bases: list[Path]) -> list[Path]:
    """Where a recipe path may be: itself when absolute (or ~), else under each base folder."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return [p]
    out: list[Path] = []
    for base in bases:
        c = Path(os.path.normpath(Path(base).absolute() / p))
        if c not in out:
            out.append(c)
    return out


def must_be_local(value: str, kind: str) -> bool:
    """A value that cannot be a hub id: a local path that must exist."""
    return not looks_like_hub_id(value) or (kind == "data" and Path(value).suffix in DATA_SUFFIXES)


def _is_template_file(value: str) -> bool:
    return "{{" not in value and "{%" not in value and (
        "/" in value or os.sep in value or Path(value).suffix in TEMPLATE_SUFFIXES)


def _recipe_paths(recipe: Recipe):
    """(dotted key, object, attribute, kind) of every path in a recipe."""
    yield "model.path", recipe.model, "path", "model"
    if recipe.model.tokenizer is not None:
        yield "model.tokenizer", recipe.model, "tokenizer", "model"
    if recipe.model.chat_template is not None and _is_template_file(recipe.model.chat_template):
        yield "model.chat_template", recipe.model, "chat_template", "template"
    for section in ("train", "eval"):
        for i, src in enumerate(getattr(recipe.data, section)):
            yield f"data.{section}.{i}.path", src, "path", "data"


def resolve_paths(recipe: Recipe, folder: Path, source: str, overrides: dict[str, str], strict: bool) -> Recipe:
    """Make the recipe's local paths absolute (see the module docstring); `strict`: a missing
    local path is an error, else it is left as written (reading a finished run's recipe)."""
    for key, obj, attr, kind in _recipe_paths(recipe):
        value = getattr(obj, attr)
        by_set = _blamed_override(key, "", overrides) is not None
        bases = [Path.cwd(), folder] if by_set else [folder, Path.cwd()]
        tried = path_candidates(value, bases)
        found = next((c for c in tried if c.exists()), None)
        if found is not None:
            setattr(obj, attr, found.read_text(encoding="utf-8") if kind == "template" else str(found))
        elif strict and (kind == "template" or must_be_local(value, kind)):
            where = f"--set {key}" if by_set else f"{source}: {key}"
            also = f" (tried {', '.join(map(str, tried))})" if len(tried) > 1 or str(tried[0]) != value else ""
            raise RecipeError(f"{where}: {value!r} does not exist{also}")
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = (), check_paths: bool = True) -> Recipe:
    data = read_recipe_file(path)
    applied: dict[str, str] = {}
    if isinstance(data, dict):
        for o in overrides:
            key, raw = apply_override(data, o)
            applied[key] = raw
    recipe = validate_recipe(data, source=str(path), overrides=applied)
    return resolve_paths(recipe, Path(path).parent, str(path), applied, strict=check_paths)


def load_run_recipe(run_dir: str | Path) -> Recipe:
    """The resolved recipe of a run (RUN_DIR/recipe.yaml). Paths that no longer exist are left
    as they are: export, generate and status do not need the data."""
    return load_recipe(Path(run_dir) / RECIPE_FILE, check_paths=False)
