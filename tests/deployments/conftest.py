"""Fixtures of the deployment and fan-out tests: the pico family of tests/flows."""

from tests.flows.conftest import pico_family  # noqa: F401  (re-exported fixture)
