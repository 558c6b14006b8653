"""Runs: the run folder and the names of its files, the papermill chain of the numbered notebooks,
and the run report."""
