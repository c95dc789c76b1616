"""zerotune training package: what runs on every rank (`python -m training RUN_DIR`)."""
