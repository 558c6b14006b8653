"""Data: decoding images, manifests and the readers that build them, the dataset of a run,
model inputs and training datasets, the real photos that ship in packages and the demo dataset."""
