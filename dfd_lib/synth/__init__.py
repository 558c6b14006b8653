"""Made images (notebook 03): image edits, Stable Diffusion regeneration, the one fake factory that
both the enrichment and the demo dataset (:mod:`dfd_lib.sources.demo`) use, and the enrichment driver
with its command."""
