"""Fixtures of the CLI tests: the pico family (tests.flows.conftest) for commands that read
real model folders."""

from tests.flows.conftest import pico_family  # noqa: F401 - a fixture
