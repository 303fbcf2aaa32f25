"""gradcore.backends: native fast paths, imported lazily by gradcore._dispatch."""
