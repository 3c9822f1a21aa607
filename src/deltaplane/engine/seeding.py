"""The seeded random streams live in :mod:`deltaplane.seeding` (below every package that trains); re-exported here."""

from deltaplane.seeding import Stream, derive_seed, numpy_rng, seeded_random_layers, torch_generator

__all__ = ["Stream", "derive_seed", "numpy_rng", "seeded_random_layers", "torch_generator"]
