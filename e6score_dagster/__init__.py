"""E6Score as Dagster assets.

`defs` is loaded on first use, so `python -m e6score_dagster.top` and other light entry points
do not import Dagster and JAX (seconds of start-up); `dagster`/`dg` find it as usual.
"""

import warnings

__all__ = ["defs"]

# Dagster's own parser of the selection `*` passes `include_sources` to `AssetSelection.all`
# and warns that this (its own) parameter is in beta: not ours to act on, so not shown.
warnings.filterwarnings(
    "ignore", message=r"Parameter `include_sources` of function `AssetSelection\.all`"
)


def __getattr__(name: str):
    if name == "defs":
        from e6score_dagster.definitions import defs

        return defs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), "defs"]
