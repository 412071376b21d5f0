"""A module whose `app` is not a fastfan.App (fastfan run --app refuses it)."""

app = object()
