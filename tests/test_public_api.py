"""Every name `astra_peft` exports is documented the PEFT way: functions with Args and Returns (and Raises where
they refuse input), classes with Args or Attributes."""

import inspect

import pytest

import astra_peft


@pytest.mark.parametrize("name", astra_peft.__all__)
def test_every_exported_name_has_a_structured_docstring(name):
    obj = getattr(astra_peft, name)
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        assert "Args:" in doc or "Attributes:" in doc, name
    else:
        assert "Args:" in doc and "Returns:" in doc, name


def test_the_docstring_check_can_fail():
    def undocumented(x):
        """Does something."""

    doc = inspect.getdoc(undocumented)
    assert not ("Args:" in doc and "Returns:" in doc)
