"""Experiment definitions: each module that defines ``EXPERIMENT`` is one experiment, by file name."""
