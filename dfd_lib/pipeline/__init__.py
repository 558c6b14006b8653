"""Runs: the run folder and the names of its files, the papermill chain of the numbered notebooks,
what a profile needs and its preflight (``dfd check``, ``dfd fetch-weights``), and the run report."""
