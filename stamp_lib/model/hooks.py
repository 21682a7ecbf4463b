"""The one hooks layer: select modules by name, see (and optionally replace) their inputs.

Activation capture (:mod:`stamp_lib.model.capture`) and quantization (:mod:`stamp_lib.model.recipe`) both
attach to a model through :func:`input_hooks`, so both accept the same inputs, report errors the
same way and leave the model the same way (every hook removed on exit, also when the body raises).
Nothing in the model's code changes.

Contract
--------
* :func:`select_modules` picks modules (``nn.Linear`` by default) by qualified name: glob
  patterns (``fnmatch``, e.g. ``"*.self_attn.q_proj"``), regexes written ``"re:<regex>"``
  (``re.fullmatch``) or compiled ``re.Pattern`` objects. A pattern that matches nothing is an
  error that lists some available names. :func:`matches` is the single matching rule.
* :func:`module_hook` is the one other way a hook is attached: one raw forward pre-hook
  (``kind="pre"``, called as ``fn(module, args, kwargs)``) or forward hook (``kind="post"``,
  ``fn(module, args, output)``) on one module, removed when the block exits.
* :func:`input_hooks` registers one forward *pre*-hook per selected module. The hook finds the
  module's input: the first positional argument, else the keyword ``input`` / ``hidden_states`` /
  ``x``, else the only tensor keyword. It calls ``fn(name, module, x)``; a returned tensor replaces
  the input (in the same positional or keyword slot), ``None`` leaves it. Any exception raised in
  ``fn`` is re-raised with the module's name in front of its message, as the same exception type
  where it can be rebuilt from a message, else as :class:`HookError` (the original is chained), so an
  error deep in a forward names its layer.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from typing import Callable

import torch
from torch import nn

__all__ = ["select_modules", "matches", "input_hooks", "module_hook", "HookError", "find_input", "same_tensor"]

_INPUT_KEYS = ("input", "hidden_states", "x")


class HookError(RuntimeError):
    """An error raised inside a module hook; the message names the module."""


def as_patterns(patterns) -> list:
    if isinstance(patterns, (str, re.Pattern)):
        return [patterns]
    try:
        pats = list(patterns)
    except TypeError:
        pats = []
    if not pats or not all(isinstance(p, (str, re.Pattern)) for p in pats):
        raise TypeError("patterns must be a glob string, 're:<regex>', a compiled regex, or a non-empty list "
                        f"of them; got {patterns!r}")
    return pats


def matches(name: str, patterns) -> bool:
    """Whether the qualified module name matches any of ``patterns`` (glob, ``re:`` or compiled regex)."""
    for pat in as_patterns(patterns):
        if isinstance(pat, re.Pattern):
            if pat.fullmatch(name) is not None:
                return True
        elif pat.startswith("re:"):
            if re.fullmatch(pat[3:], name) is not None:
                return True
        elif fnmatch.fnmatchcase(name, pat):
            return True
    return False


def select_modules(model: nn.Module, patterns="*", types=(nn.Linear,)) -> dict[str, nn.Module]:
    """Modules of class ``types`` whose qualified name matches any pattern, in ``named_modules`` order.

    Every pattern must match at least one module (a typo is an error, not a silent no-op)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    pats = as_patterns(patterns)
    cands = {n: m for n, m in model.named_modules() if n and isinstance(m, types)}
    kinds = "/".join(t.__name__ for t in types)
    if not cands:
        raise ValueError(f"the model has no {kinds} modules")
    for p in pats:
        if not any(matches(n, p) for n in cands):
            raise ValueError(f"pattern {p!r} matches no {kinds} module; names look like: {list(cands)[:6]}")
    return {n: m for n, m in cands.items() if matches(n, pats)}


def same_tensor(a: torch.Tensor, b: torch.Tensor, version: int | None = None) -> bool:
    """Exactly the same tensor still alive and unmodified (storage, shape, strides, dtype, device,
    version counter): how modules fed one input (q/k/v, gate/up) are recognised, never by value.

    ``version``: ``a._version`` when ``a`` was recorded. Pass it: ``a`` kept as the tensor itself
    (or a ``detach()``/view of it) shares its version counter with ``b``, so an in-place change made
    since then moves both counters and only the recorded number shows it."""
    va = a._version if version is None else version
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device and va == b._version)


def find_input(name: str, args: tuple, kwargs: dict) -> tuple[torch.Tensor, object]:
    """``(x, slot)``: the module's input tensor and where it was (an int position or a keyword)."""
    if args:
        x, slot = args[0], 0
    else:
        keys = [k for k in _INPUT_KEYS if k in kwargs] or [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        if len(keys) != 1 and not any(k in kwargs for k in _INPUT_KEYS):
            raise HookError(f"{name}: cannot tell which argument is the input (keywords {sorted(kwargs)})")
        slot = keys[0]
        x = kwargs[slot]
    if not isinstance(x, torch.Tensor):
        raise HookError(f"{name}: the input is a {type(x).__name__}, not a tensor")
    return x, slot


def _named(e: Exception, name: str) -> Exception:
    """The same kind of exception with the module's name in front of its message (a
    :class:`HookError` when the type cannot be rebuilt from a message)."""
    msg = str(e)
    if msg.startswith(f"{name}:"):
        return e
    try:
        new = type(e)(f"{name}: {msg}")
    except Exception:
        new = None
    if not isinstance(new, Exception) or str(new) != f"{name}: {msg}":
        new = HookError(f"{name}: {type(e).__name__}: {msg}")
    return new


@contextlib.contextmanager
def input_hooks(modules: dict[str, nn.Module], fn: Callable[[str, nn.Module, torch.Tensor], torch.Tensor | None]):
    """Call ``fn(name, module, x)`` on the input of every module in ``modules`` (``{name: module}``,
    e.g. from :func:`select_modules`) for the duration of the block; see the module docstring."""

    def make(name):
        def pre_hook(module, args, kwargs):
            x, slot = find_input(name, args, kwargs)
            try:
                out = fn(name, module, x)
            except Exception as e:
                new = _named(e, name)
                if new is e:
                    raise
                raise new from e
            if out is None:
                return None
            if isinstance(slot, int):
                return (out, *args[1:]), kwargs
            return args, {**kwargs, slot: out}
        return pre_hook

    handles = []
    try:
        for name, m in modules.items():
            handles.append(m.register_forward_pre_hook(make(name), with_kwargs=True))
        yield modules
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def module_hook(module: nn.Module, fn: Callable, kind: str = "pre"):
    """Attach ``fn`` to ``module`` for the duration of the block: a forward pre-hook with keyword
    arguments (``kind="pre"``: ``fn(module, args, kwargs)`` may return ``(args, kwargs)``) or a
    forward hook (``kind="post"``: ``fn(module, args, output)`` may return a new output)."""
    if kind == "pre":
        h = module.register_forward_pre_hook(fn, with_kwargs=True)
    elif kind == "post":
        h = module.register_forward_hook(fn)
    else:
        raise ValueError(f"kind must be 'pre' or 'post', got {kind!r}")
    try:
        yield module
    finally:
        h.remove()
