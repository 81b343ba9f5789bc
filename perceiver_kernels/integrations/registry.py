"""The supported libraries: one module of this package each, one line each here (docs/INTEGRATIONS.md,
"Adding a library")."""

import importlib

LIBRARIES = (
    "transformers_perceiver",
    "perceiver_pytorch",
    "perceiver_ar_pytorch",
)

INTEGRATIONS = {}
for _library in LIBRARIES:
    for _integration in importlib.import_module(f".{_library}", __package__).INTEGRATIONS:
        if _integration.key in INTEGRATIONS:
            raise RuntimeError(f"integration key {_integration.key!r} of {_library} is taken")
        INTEGRATIONS[_integration.key] = _integration
