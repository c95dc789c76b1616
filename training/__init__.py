"""zerotune training package: what runs on every rank (`python -m zerotune.training RUN_DIR`)."""
