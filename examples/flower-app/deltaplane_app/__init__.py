"""deltaplane on Flower: the digits federation with compressed deltas (see ../README.md)."""
