"""Command implementations, one module per area; each exposes ``register(app)`` for :mod:`deltaplane.cli`."""
