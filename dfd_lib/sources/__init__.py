"""Where a run's images come from (notebook 01): the real photos that ship inside packages, the demo
dataset made from them with the fake factory, and the dataset of a run (competition folders, real/ fake/
trees, manifests, or the demo) with its splits."""
