"""Small applications (fastfan.App) the hook tests run with `--app apps.NAME:app`."""
