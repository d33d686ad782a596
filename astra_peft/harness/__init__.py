"""The harness: the upper floor of astra-peft (models, data, methods, training, evaluation, reports, CLI).

It is installed with the `[harness]` extra and builds on the library (`astra_peft`), never the other way
round: `tests/test_layers_of_the_house.py` fails if a library module imports anything from here.
"""

from importlib.util import find_spec

# The extra's packages, by import name: a missing one is reported here, once, with the install command,
# instead of as an ImportError from deep inside whichever harness module happened to need it first.
_EXTRA = {"accelerate": "accelerate", "gguf": "gguf", "matplotlib": "matplotlib", "psutil": "psutil"}
_missing = [pkg for module, pkg in _EXTRA.items() if find_spec(module) is None]
if _missing:
    raise ImportError(
        f"The astra-peft harness needs {', '.join(_missing)}: install it with `pip install -e '.[harness]'` "
        "(the library itself, `import astra_peft`, does not)."
    )
