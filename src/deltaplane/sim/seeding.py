"""The seeded random streams live in :mod:`deltaplane.seeding`; re-exported here."""

from deltaplane.seeding import Stream, derive_seed, numpy_rng, torch_generator

__all__ = ["Stream", "derive_seed", "numpy_rng", "torch_generator"]
