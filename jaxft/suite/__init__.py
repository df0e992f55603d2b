"""Experiment suites: a matrix of runs from one file (`jaxft suite`)."""
