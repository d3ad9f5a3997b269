"""Exceptions whose message is meant for the user (printed without a traceback)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a bad request: the message names the file/row and what to do."""


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says what to fix."""
