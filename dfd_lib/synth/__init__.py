"""Made images (notebook 03): image edits, Stable Diffusion regeneration, the one fake factory that
both the enrichment and the demo builder use, and the enrichment driver with its command."""
