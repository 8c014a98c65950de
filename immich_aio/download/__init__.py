"""Getting models into the store: hub downloads (mirror-aware), exports, imports. Never used while serving."""
