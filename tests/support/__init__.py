"""Helpers shared by several test folders (numeric checks whose power to fail is itself tested)."""
