"""A module that does not import (fastfan run --app refuses it)."""

raise ImportError("this application needs a database driver that is not installed")
