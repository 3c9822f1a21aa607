"""YAML as deltaplane's config files read it: PyYAML's safe loader, refusing a key given twice and documents
that would not stay small once read.

PyYAML keeps the last of two equal keys silently, so a second ``rounds:`` further down a long run config, or a
second ``merge_method:`` in a merge config, would quietly win over the first. Every config file deltaplane reads
goes through :func:`load_yaml`, so both refuse it the same way (:class:`~deltaplane.errors.ConfigError` naming
both lines). YAML's merge key (``<<: *defaults``) works as in the safe loader: a key written out wins over a
merged one, as the YAML merge-key spec says; ``<<`` itself given twice is refused like any other key.

Aliases are shared objects, so a few hundred bytes of ``&a``/``*a`` (a "billion laughs" document) load
instantly but expand to hundreds of millions of values in whatever walks them next (pydantic's serializer,
``json.dumps``); a document refers to itself through an alias, or nests deeper than any config needs, only to
break its reader. :func:`load_yaml` measures the composed document before building any Python object and
refuses all three.
"""

from __future__ import annotations

import functools
from typing import Any

from deltaplane.errors import ConfigError

__all__ = ["MAX_DEPTH", "MAX_VALUES", "describe_yaml_error", "load_yaml"]

#: the most values (scalars, lists, mappings) a document may hold once its aliases are expanded: far above any
#: config (a merge config with per-layer gradients holds a few thousand), far below what hangs a process
MAX_VALUES = 1_000_000
#: the deepest a document may nest (configs nest 3 or 4 levels; PyYAML itself recurses per level)
MAX_DEPTH = 100

_MERGE_TAG = "tag:yaml.org,2002:merge"


def _unique_mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
    from yaml.constructor import ConstructorError

    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        # '<<' merges another mapping in (the safe loader's flatten_mapping does it): it has no constructor
        # of its own, and the keys it brings are overridden by those written out, not duplicates of them
        key = "<<" if key_node.tag == _MERGE_TAG else loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # a list or mapping as a key: what the safe loader says, with the line
            raise ConstructorError(
                "while constructing a mapping", node.start_mark, "found unhashable key", key_node.start_mark
            ) from None
        if first is not None:
            raise ConfigError(
                f"key {key!r} is given twice (lines {first + 1} and {key_node.start_mark.line + 1}); keep one"
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


def _children(node: Any) -> list[Any]:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_size(root: Any) -> None:
    """Refuse a composed document that nests deeper than :data:`MAX_DEPTH`, refers to itself, or holds more
    than :data:`MAX_VALUES` values with its aliases expanded.

    One pass over the distinct nodes (an alias is the node it names, composed once): each node's expanded size
    is one plus its children's, remembered, so the measure costs what the text costs, not what it expands to.
    Iterative, so the measure itself never recurses.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # started, not finished: in a depth-first walk, the current node's ancestors
    stack: list[tuple[Any, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise ConfigError(
                f"the YAML at line {node.start_mark.line + 1} refers to itself through an alias; "
                "a config cannot be recursive"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"the YAML at line {node.start_mark.line + 1} is nested deeper than {MAX_DEPTH} levels"
            )
        open_nodes.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in _children(node) if id(c) not in sizes)
    if sizes[id(root)] > MAX_VALUES:
        raise ConfigError(
            f"the YAML's aliases expand to {sizes[id(root)]:,} values, more than the {MAX_VALUES:,} a config "
            "may hold; write the values out instead of repeating aliases"
        )


def load_yaml(text: str) -> Any:
    """``text`` parsed as YAML by a safe loader (no Python objects) that refuses duplicate keys.

    Raises:
        ConfigError: a key is given twice in one mapping, or the document nests deeper than :data:`MAX_DEPTH`,
            refers to itself or expands to more than :data:`MAX_VALUES` values through aliases.
        yaml.YAMLError: the text is not YAML (callers say where, with the file's name).
    """
    loader = _unique_key_loader()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node)
        return loader.construct_document(node)
    except RecursionError:  # PyYAML composes recursively: a document nested thousands deep ends here
        raise ConfigError(
            f"the YAML is nested too deeply (a config may nest at most {MAX_DEPTH} levels)"
        ) from None
    finally:
        loader.dispose()


def describe_yaml_error(exc: Exception) -> str:
    """``invalid YAML at line L, column C: problem`` for a ``yaml.YAMLError`` (1-based, where PyYAML knows it)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{where}: {getattr(exc, 'problem', None) or exc}"
