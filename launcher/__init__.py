"""zerotune launcher: from a recipe to a runnable job. Never imports torch at module level."""
