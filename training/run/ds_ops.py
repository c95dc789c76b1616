"""DeepSpeed's C++ ops (CPU Adam, fused Adam, CPU communication) are compiled the first time a
run needs them (about 2 minutes, with gcc/g++), into torch's extension cache.

- The cache lives per environment, <sys.prefix>/.torch_extensions (a venv's own folder), unless
  TORCH_EXTENSIONS_DIR is set or the environment is not writable: two environments (another
  torch or DeepSpeed version) no longer rebuild, or load, each other's ops.
- The first start says so: "building DeepSpeed ops (one time, ~2 min)", once per node, instead
  of minutes of silence. DeepSpeed builds an op in OpBuilder.jit_load; `announce_builds()` wraps
  it to print that line when the op's library is not in the cache yet. Ops installed with
  DeepSpeed (DS_BUILD_*=1, as in docker/Dockerfile) never reach jit_load.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"


def use_environment_cache(environ=os.environ) -> str | None:
    """Point torch's extension cache into this environment (unless the user chose one); returns it."""
    if environ.get(EXTENSIONS_ENV):
        return environ[EXTENSIONS_ENV]
    if not os.access(sys.prefix, os.W_OK):
        return None  # a system interpreter: torch's default (~/.cache/torch_extensions)
    environ[EXTENSIONS_ENV] = str(Path(sys.prefix) / ".torch_extensions")
    return environ[EXTENSIONS_ENV]


def is_built(name: str) -> bool:
    from torch.utils.cpp_extension import _get_build_directory
    return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()


def announce_builds(local_rank: int) -> None:
    """Print one line before DeepSpeed compiles an op that is not cached yet (local rank 0)."""
    from deepspeed.ops.op_builder.builder import OpBuilder
    if getattr(OpBuilder.jit_load, "_zerotune", False):
        return
    original = OpBuilder.jit_load

    @functools.wraps(original)
    def jit_load(self, *args, **kwargs):
        if local_rank == 0 and not is_built(self.name):
            print(f"zerotune: building DeepSpeed ops (one time, ~2 min): {self.name} into "
                  f"{os.environ.get(EXTENSIONS_ENV, 'the torch extension cache')}", file=sys.stderr, flush=True)
        return original(self, *args, **kwargs)
    jit_load._zerotune = True
    OpBuilder.jit_load = jit_load
