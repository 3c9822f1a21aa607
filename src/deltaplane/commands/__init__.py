"""CLI command implementations, one module per area, each exposing ``register(app)``."""
