"""YAML as deltaplane's config files read it: PyYAML's safe loader, refusing a key given twice.

PyYAML keeps the last of two equal keys silently, so a second ``rounds:`` further down a long run config, or a
second ``merge_method:`` in a merge config, would quietly win over the first. Every config file deltaplane reads
goes through :func:`load_yaml`, so both refuse it the same way (:class:`~deltaplane.errors.ConfigError` naming
both lines).
"""

from __future__ import annotations

import functools
from typing import Any

from deltaplane.errors import ConfigError

__all__ = ["load_yaml"]


def _unique_mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); keep one"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


@functools.cache
def _unique_key_loader() -> type:
    """``yaml.SafeLoader`` with :func:`_unique_mapping` for every mapping (built on first use: yaml loads lazily)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` whose mappings refuse duplicate keys."""

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
    return UniqueKeyLoader


def load_yaml(text: str) -> Any:
    """``text`` parsed as YAML by a safe loader (no Python objects) that refuses duplicate keys.

    Raises:
        ConfigError: a key is given twice in one mapping.
        yaml.YAMLError: the text is not YAML (callers say where, with the file's name).
    """
    import yaml

    return yaml.load(text, Loader=_unique_key_loader())
