"""The model definitions: backbones by name (with their weights' provenance), experts and their
mixture, our checkpoint format and the original release's, and loading either."""
