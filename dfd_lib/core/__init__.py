"""The foundation every layer stands on: project paths, atomic writes, step configs (typed dataclasses),
logging and progress, figures, crash points for fault tests, the run folder and the names of its files,
and how a ``dfd`` subcommand runs. It imports nothing else of ``dfd_lib``."""
