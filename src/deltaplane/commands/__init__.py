"""CLI command implementations, one module per area; ``deltaplane.cli`` registers each module's commands."""
