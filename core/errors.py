"""One base class for every error a user can fix: the CLI prints its message as one line
(`zerotune: error: ...`) and exits 2, never a traceback. Messages name the file, row or key."""
from __future__ import annotations


class UserError(Exception):
    """Something in the user's recipe, data, files or command line; the message says what and where."""
    user_facing = True


class RecipeError(UserError, ValueError):
    """A recipe that cannot run. The message names the file and key(s); print it as is."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, from another run), or a save that failed."""
