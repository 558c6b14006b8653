"""``dfd serve``: the HTTP API (the original ``/predict`` contract and more), request parsing, the
model worker and the static web page."""
