"""YAML read strictly: a key given twice in one mapping is an error, not the last value silently winning (a routing
file with ``rules:`` twice would drop the first block of rules).

PyYAML keeps the last of duplicate keys. :func:`check_unique_keys` reads the document's node tree (before any value is
built, so it works whatever constructs the values) and refuses a mapping holding a key twice; :func:`load_yaml` is
``yaml.safe_load`` after that check, and :func:`refuse_duplicate_keys_in_configs` puts the same check in front of
jsonargparse's YAML loader, which reads the entry points' ``--config`` files and option values.
"""

from __future__ import annotations

from typing import Any

import yaml

from attnprune.errors import UserError

__all__ = ["DuplicateKeyError", "check_unique_keys", "load_yaml", "refuse_duplicate_keys_in_configs"]


class DuplicateKeyError(UserError, yaml.YAMLError):
    """A YAML mapping holds a key twice (a ``YAMLError`` too, so YAML readers report it as bad YAML)."""


def check_unique_keys(text: str) -> None:
    """Refuse a YAML document in which one mapping holds a key twice.

    Raises:
        DuplicateKeyError: naming the key and the lines of both (1-based).
        yaml.YAMLError: ``text`` is not YAML.

    Example:
        >>> check_unique_keys("rules: []\\nname: a\\nrules: []")
        Traceback (most recent call last):
        ...
        attnprune.strict_yaml.DuplicateKeyError: key 'rules' is given twice (lines 1 and 3)
    """
    stack = [yaml.compose(text, Loader=yaml.SafeLoader)]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else id(key)
                line = key.start_mark.line + 1
                if name in seen:
                    raise DuplicateKeyError(f"key {name!r} is given twice (lines {seen[name]} and {line})")
                seen[name] = line
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing a key given twice in one mapping (:func:`check_unique_keys`).

    Raises:
        DuplicateKeyError: a key given twice.
        yaml.YAMLError: ``text`` is not YAML.
    """
    check_unique_keys(text)
    return yaml.safe_load(text)


def refuse_duplicate_keys_in_configs() -> None:
    """Put :func:`check_unique_keys` in front of jsonargparse's YAML loader (its ``--config`` files and option
    values); once per process, however often called."""
    import jsonargparse

    loader = jsonargparse.get_loader("yaml")
    if getattr(loader, "refuses_duplicate_keys", False):
        return

    def strict(stream: str, path: str = "") -> Any:  # jsonargparse passes a config file's path
        if isinstance(stream, str):
            try:
                check_unique_keys(stream)
            except DuplicateKeyError as err:
                raise DuplicateKeyError(f"{path}: {err}" if path else str(err)) from None
        return loader(stream)

    strict.refuses_duplicate_keys = True  # type: ignore[attr-defined]
    jsonargparse.set_loader("yaml", strict, (yaml.YAMLError,))
