"""The user's Python code that Quartet is told to run: reward functions, tools, environments.

They are named by specs 'package.module:name' (on the command line, or a comma-separated list of
them); `load_callable` imports one and says what is wrong with a bad one. `keywords_taken` picks
the keyword arguments a user function accepts, so functions name only the columns they need.
No torch here: the agent environments import this without the model stack.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def load_callable(spec: str, setting: str) -> Callable:
    """Import 'package.module:name' (or 'package.module.name'); `setting` names where the spec came
    from (e.g. 'models.reward_fn') for the errors."""
    spec = spec.strip()
    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{setting} '{spec}' should look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"{setting} '{spec}' cannot be imported: {err} (is the package installed, "
                         "or its directory on PYTHONPATH?)") from None
    except Exception as err:  # the module itself failed while importing: say how
        raise ValueError(f"{setting} '{spec}' cannot be imported: importing {module_name} raised "
                         f"{type(err).__name__}: {err}") from err
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{setting} '{spec}' cannot be imported: module '{module_name}' has no attribute "
                         f"'{attr}'") from None
    if not callable(fn):
        raise ValueError(f"{setting} '{spec}' is not callable: {module_name}.{attr} is a {type(fn).__name__}")
    return fn


def load_callables(specs: str | Sequence[str], setting: str) -> list[Callable]:
    """Several specs, as a list or one comma-separated string."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    return [load_callable(spec, setting) for spec in specs]


def function_name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def keywords_taken(fn: Callable, available: Mapping[str, Any], exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The entries of `available` that `fn` accepts as keywords: all of them with **kwargs, else
    those it names (never those in `exclude`)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: it takes no extra keywords
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {k: v for k, v in available.items() if k not in exclude}
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in available.items() if k in names and k not in exclude}
