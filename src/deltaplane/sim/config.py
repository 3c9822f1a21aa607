"""The run configuration lives in the engine (:mod:`deltaplane.engine.config`); re-exported here."""

from deltaplane.engine.config import RunConfig

__all__ = ["RunConfig"]
