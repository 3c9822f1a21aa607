"""Built-in tasks and demo follow-ups, above the drivers: ``deltaplane.apps.digits`` (the default run's task)
and ``deltaplane.apps.names`` (a second task of another kind). Each exposes ``make_task`` for ``--task``."""
