"""Data formats and readers (notebook 01 and every later step): decoding images, the manifest and the
readers that build it from datasets on disk, the re-split table, model inputs and training datasets."""
