"""Built-in tasks and demo follow-ups, above the drivers: ``deltaplane.apps.digits`` (the default run's task and
its follow-up), ``deltaplane.apps.charlm`` (a second task of another kind) and ``deltaplane.apps.docstrings``
(MiniLM, optionally LoRA). Each exposes ``make_task`` for ``--task``; ``deltaplane.apps.runner`` picks the
driver."""
