"""Fixtures of the merge tests: the pico family (tests/flows/conftest.py)."""

from tests.flows.conftest import pico_family  # noqa: F401
