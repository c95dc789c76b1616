"""Reading a recipe: YAML file -> overrides (`--set a.b=value`) -> validated Recipe, with every
validation error as one line naming the file and key."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import RecipeError
from .layout import RECIPE_FILE

if TYPE_CHECKING:
    from .recipe import Recipe


def _format_error(err: dict, source: str) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith(("literal[", "function-"))))
    kind, ctx, inp = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "literal_error":
        allowed = ", ".join(a or b for a, b in re.findall(r"'([^']*)'|\b(\d+)\b", ctx.get("expected", "")))
        msg = f"{inp!r} is not one of {allowed}"
    elif kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "required key is missing"
    else:
        msg = err["msg"].removeprefix("Value error, ")
    return f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}"


def _merge_union_errors(errors: list[dict]) -> list[dict]:
    """A Union field yields one error per branch; keep one line per key."""
    seen, out = set(), []
    for e in errors:
        key = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("literal[", "function-"))))
        if key in seen:
            continue
        seen.add(key)
        out.append(e)
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            for sub in (cand, *getattr(cand, "__args__", ())):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    model = sub
                    break
    return list(model.model_fields)


def validate_recipe(data: Any, source: str = "recipe") -> Recipe:
    from .recipe import Recipe
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in _merge_union_errors(e.errors()):
            line = _format_error(err, source)
            if err["type"] == "extra_forbidden":
                allowed = _allowed_keys(Recipe, err["loc"])
                if allowed:
                    line += f" (allowed: {', '.join(allowed)})"
            lines.append(line)
        raise RecipeError("\n".join(lines)) from None


def apply_override(data: dict, assignment: str) -> None:
    """`a.b.c=value`: value parsed as YAML; creates missing sections."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"--set {assignment!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {key}: value {raw!r} is not valid YAML ({e.problem})") from None
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            if p in node and node[p] is not None:
                raise RecipeError(f"--set {key}: {p!r} is not a section")
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


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


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    data = read_recipe_file(path)
    if isinstance(data, dict):
        for o in overrides:
            apply_override(data, o)
    return validate_recipe(data, source=str(path))


def load_run_recipe(run_dir: str | Path) -> Recipe:
    """The resolved recipe of a run (RUN_DIR/recipe.yaml)."""
    return load_recipe(Path(run_dir) / RECIPE_FILE)

