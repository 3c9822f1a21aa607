"""The seeded random streams live in the engine (:mod:`deltaplane.engine.seeding`); re-exported here."""

from deltaplane.engine.seeding import Stream, derive_seed, numpy_rng, torch_generator

__all__ = ["Stream", "derive_seed", "numpy_rng", "torch_generator"]
