"""Applications (fastfan.App) the hooks study runs with `--app apps.NAME:app`."""
