"""The usage examples in the data modules' docstrings run and give the shown results."""
import doctest
import importlib

import pytest

MODULES = ["convert", "sft", "packing", "collate", "pipeline", "jsonl", "mindrecord", "validate"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"qwen2ms.data.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_examples_are_present():
    # guards the test above from passing vacuously if the examples are removed
    counts = {n: doctest.testmod(importlib.import_module(f"qwen2ms.data.{n}")).attempted for n in MODULES}
    assert sum(counts.values()) >= 10 and counts["packing"] >= 3 and counts["convert"] >= 2
