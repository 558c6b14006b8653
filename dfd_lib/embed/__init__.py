"""Embeddings and what is read from them (notebooks 01-02): the cached embeddings of a manifest,
separability numbers, the UMAP map and its figures, clusters and leave-one-cluster-out re-splits."""
