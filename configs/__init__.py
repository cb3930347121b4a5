"""Shipped recipes, sweeps, grids and evaluation suites (package data: ``dareflow.configs``)."""
