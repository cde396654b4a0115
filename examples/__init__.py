"""Users of the library: consumers of ``//embed``'s public API only."""
