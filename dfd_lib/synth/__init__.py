"""Made images (notebook 03): image edits, Stable Diffusion regeneration, the kinds of family
(:mod:`~dfd_lib.synth.kinds`) and the one fake factory, their registry (:mod:`~dfd_lib.synth.factory`), that
both the enrichment and the demo dataset (:mod:`dfd_lib.sources.demo`) use, and the enrichment driver
with its command."""
