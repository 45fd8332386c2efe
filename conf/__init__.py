"""Configuration: the Arvados cluster config format, loaded into frozen dataclasses."""
