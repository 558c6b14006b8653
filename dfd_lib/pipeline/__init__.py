"""Runs: the numbered notebooks as steps, profiles and parameter precedence, the papermill chain, what a
profile needs and its preflight (``dfd check``, ``dfd fetch-weights``), the environment record, the run
report, ``dfd rerun`` and ``dfd compare``."""
