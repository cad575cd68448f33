"""kdreg's built-in plugins, registered through the entry-point group ``kdreg`` like any other."""
