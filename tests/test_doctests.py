"""The examples in the public API's docstrings run and print what they say (as torchmetrics runs its own)."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest

import attnprune

MODULES = [
    "attnprune.atomic",
    "attnprune.errors",
    "attnprune.vit",
    "attnprune.flops",
    "attnprune.inference",
    "attnprune.io",
    "attnprune.adapters",
    "attnprune.adapters.architectures",
    "attnprune.fidelity",
    "attnprune.routing.rules",
    "attnprune.routing.core",
    "attnprune.routing.baselines",
    "attnprune.selectivity.transition",
    "attnprune.strict_yaml",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} of {result.attempted} examples failed"


def test_every_public_function_of_the_api_has_an_example():
    """Each function and class in ``attnprune.__all__`` shows how it is called, in a module listed above."""
    for name in attnprune.__all__:
        obj = getattr(attnprune, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert ">>>" in (inspect.getdoc(obj) or ""), f"attnprune.{name} has no example"
            assert obj.__module__ in MODULES, f"attnprune.{name} lives in {obj.__module__}, whose examples do not run"
