"""stamp_lib.model.hooks: module selection, input hooks that leave the model exactly as they found
it, errors that name their module, and how a module's input is found and recognised."""

import re

import pytest
import torch
from torch import nn

from stamp_lib.model import hooks
from stamp_lib.model.hooks import HookError, find_input, input_hooks, module_hook, same_tensor, select_modules

HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(self.proj(torch.relu(self.fc(x))))


class Net(nn.Module):
    def __init__(self, d=8, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class KwModule(nn.Module):
    """Takes its input by keyword (as Hugging Face layers do), plus other arguments."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, hidden_states=None, mask=None, scale=1.0):
        self.seen.append((hidden_states, mask, scale))
        return hidden_states * scale


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().double()


def _x(seed=1):
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _no_hooks(model):
    for name, m in model.named_modules():
        for attr in HOOK_DICTS:
            assert not getattr(m, attr), (name or "<root>", attr, getattr(m, attr))


# =============================================================================================
# exact restore
# =============================================================================================
def test_input_hooks_change_the_forward_only_inside_the_block():
    model, x = _net(), _x()
    ref = model(x)
    mods = select_modules(model, "*")
    calls = []

    def fn(name, module, t):
        calls.append(name)
        return t * 0.5

    with input_hooks(mods, fn) as got:
        assert got is mods
        changed = model(x)
    assert calls == list(mods)  # every selected module, in forward order
    assert not torch.allclose(changed, ref)
    _no_hooks(model)
    assert torch.equal(model(x), ref)
    assert calls == list(mods)  # nothing called after the block


def test_input_hooks_removed_when_the_body_raises():
    model, x = _net(), _x()
    ref = model(x)
    with pytest.raises(KeyError, match="body"):
        with input_hooks(select_modules(model, "*"), lambda n, m, t: t + 1):
            model(x)
            raise KeyError("body")
    _no_hooks(model)
    assert torch.equal(model(x), ref)


def test_input_hooks_removed_when_a_hook_raises_mid_forward():
    model, x = _net(), _x()
    ref = model(x)

    def fn(name, module, t):
        if name == "blocks.1.proj":
            raise ValueError("bad input")
        return t

    with pytest.raises(ValueError, match=r"^blocks\.1\.proj: bad input$"):
        with input_hooks(select_modules(model, "*"), fn):
            model(x)
    _no_hooks(model)
    assert torch.equal(model(x), ref)


def test_input_hooks_removed_when_registration_fails_half_way():
    model = _net()
    mods = {"blocks.0.fc": model.blocks[0].fc, "oops": "not a module"}
    with pytest.raises(AttributeError):
        with input_hooks(mods, lambda n, m, t: None):
            pass  # pragma: no cover - never entered
    _no_hooks(model)


@pytest.mark.parametrize("kind", ["pre", "post"])
def test_module_hook_restores_the_module(kind):
    model, x = _net(), _x()
    ref = model(x)
    target = model.blocks[1].proj
    if kind == "pre":
        def fn(module, args, kwargs):
            return (args[0] * 0,), kwargs
    else:
        def fn(module, args, output):
            return output * 0
    with module_hook(target, fn, kind=kind) as m:
        assert m is target
        out = model(x)
    assert not torch.allclose(out, ref)
    _no_hooks(model)
    assert torch.equal(model(x), ref)
    with pytest.raises(RuntimeError, match="body"):
        with module_hook(target, fn, kind=kind):
            raise RuntimeError("body")
    _no_hooks(model)
    assert torch.equal(model(x), ref)


def test_module_hook_pre_sees_keywords_and_post_sees_the_output():
    m = KwModule()
    t = torch.ones(2, 3)
    seen = {}

    def pre(module, args, kwargs):
        seen["pre"] = (args, dict(kwargs))
        return args, {**kwargs, "scale": 3.0}

    def post(module, args, output):
        seen["post"] = output.clone()
        return output + 1

    with module_hook(m, pre, "pre"), module_hook(m, post, "post"):
        out = m(hidden_states=t, scale=2.0)
    assert seen["pre"] == ((), {"hidden_states": t, "scale": 2.0})
    torch.testing.assert_close(seen["post"], 3 * t)
    torch.testing.assert_close(out, 3 * t + 1)
    _no_hooks(m)


def test_module_hook_rejects_an_unknown_kind_and_registers_nothing():
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="kind must be 'pre' or 'post', got 'post_hook'"):
        with module_hook(m, lambda *a: None, kind="post_hook"):
            pass  # pragma: no cover - never entered
    _no_hooks(m)


# =============================================================================================
# nesting and replacement
# =============================================================================================
def test_nested_input_hooks_compose_in_registration_order():
    model, x = _net(), _x()
    ref = model(x)
    order = []

    def add(name, module, t):
        order.append(("add", name))
        return t + 1

    def double(name, module, t):
        order.append(("double", name))
        return t * 2

    outer = select_modules(model, ["blocks.0.*", "blocks.1.fc"])
    inner = select_modules(model, "blocks.0.fc")  # overlaps the outer selection
    with input_hooks(outer, add):
        with input_hooks(inner, double):
            assert len(model.blocks[0].fc._forward_pre_hooks) == 2
            nested = model(x)
        # the inner hook is gone, the outer ones stay
        assert len(model.blocks[0].fc._forward_pre_hooks) == 1
        assert len(model.blocks[1].fc._forward_pre_hooks) == 1
    _no_hooks(model)
    assert order[:3] == [("add", "blocks.0.fc"), ("double", "blocks.0.fc"), ("add", "blocks.0.proj")]
    # the same forward by hand: blocks.0.fc sees (x + 1) * 2, blocks.0.proj and blocks.1.fc see input + 1
    b0, b1 = model.blocks[0], model.blocks[1]
    h = b0.norm(b0.proj(torch.relu(b0.fc((x + 1) * 2)) + 1))
    h = b1.norm(b1.proj(torch.relu(b1.fc(h + 1))))
    h = model.blocks[2](h)
    torch.testing.assert_close(nested, model.head(h), rtol=0, atol=0)
    assert torch.equal(model(x), ref)


def test_a_returned_tensor_replaces_the_input_in_its_slot():
    m = KwModule()
    t, mask = torch.ones(2, 3), torch.zeros(2, 3)
    with input_hooks({"kw": m}, lambda n, mod, x: x + 5):
        m(t, mask, scale=2.0)                       # positional: other arguments kept
        m(hidden_states=t, mask=mask, scale=3.0)    # keyword slot
        m(mask=mask, hidden_states=t)               # keyword slot, other order
    (h0, m0, s0), (h1, m1, s1), (h2, m2, s2) = m.seen
    for h in (h0, h1, h2):
        torch.testing.assert_close(h, t + 5)
    assert m0 is mask and m1 is mask and m2 is mask  # the other tensor is not touched
    assert (s0, s1, s2) == (2.0, 3.0, 1.0)
    assert torch.equal(t, torch.ones(2, 3))  # the caller's tensor is not modified


def test_a_hook_returning_none_leaves_the_input():
    m = KwModule()
    t = torch.randn(2, 3)
    with input_hooks({"kw": m}, lambda n, mod, x: None):
        m(t)
        m(hidden_states=t)
    assert m.seen[0][0] is t and m.seen[1][0] is t


# =============================================================================================
# selection
# =============================================================================================
def test_select_modules_glob_regex_and_compiled_patterns():
    model = _net()
    all_linear = ["blocks.0.fc", "blocks.0.proj", "blocks.1.fc", "blocks.1.proj", "blocks.2.fc",
                  "blocks.2.proj", "head"]
    assert list(select_modules(model)) == all_linear
    assert list(select_modules(model, "*.fc")) == ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc"]
    assert list(select_modules(model, "blocks.[02].*")) == ["blocks.0.fc", "blocks.0.proj", "blocks.2.fc",
                                                           "blocks.2.proj"]
    assert list(select_modules(model, r"re:blocks\.[12]\.proj")) == ["blocks.1.proj", "blocks.2.proj"]
    assert list(select_modules(model, re.compile(r"blocks\.\d\.fc|head"))) == [
        "blocks.0.fc", "blocks.1.fc", "blocks.2.fc", "head"]
    # a list of mixed patterns: the union, in model order, each module once
    assert list(select_modules(model, ["head", "re:blocks\\.0\\..*", "blocks.0.fc"])) == [
        "blocks.0.fc", "blocks.0.proj", "head"]
    # regexes match the whole name, not a part of it
    assert hooks.matches("blocks.0.fc", "re:blocks\\.0\\.fc")
    assert not hooks.matches("blocks.0.fc", "re:fc")
    assert not hooks.matches("blocks.0.fc", re.compile("blocks"))
    assert hooks.matches("blocks.0.fc", ["nope", re.compile(r".*\.fc")])
    # other module types
    assert list(select_modules(model, "*", types=(nn.LayerNorm,))) == ["blocks.0.norm", "blocks.1.norm",
                                                                      "blocks.2.norm"]
    mods = select_modules(model, "head")
    assert mods["head"] is model.head


@pytest.mark.parametrize("pattern", ["blocks.*.nope", "re:blocks\\.9\\..*", re.compile("fc"), "re:fc"])
def test_a_pattern_that_matches_nothing_is_a_clear_error(pattern):
    model = _net()
    with pytest.raises(ValueError) as e:
        select_modules(model, ["*.fc", pattern])
    msg = str(e.value)
    assert repr(pattern) in msg and "matches no Linear module" in msg
    assert "blocks.0.fc" in msg and "blocks.0.proj" in msg  # some names to choose from


def test_select_modules_bad_arguments():
    model = _net()
    with pytest.raises(ValueError, match="no Linear modules"):
        select_modules(nn.Sequential(nn.ReLU(), nn.Tanh()))
    with pytest.raises(ValueError, match="matches no LayerNorm module"):
        select_modules(model, "*.fc", types=(nn.LayerNorm,))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        select_modules({"fc": nn.Linear(2, 2)})
    for bad in ([], 3, None, ["*.fc", 3], [b"head"]):
        with pytest.raises(TypeError, match="patterns must be"):
            select_modules(model, bad)


# =============================================================================================
# errors raised in a hook
# =============================================================================================
class NeedsTwo(Exception):
    def __init__(self, code, detail):
        super().__init__(f"code {code}: {detail}")


class FixedMessage(Exception):
    def __str__(self):
        return "always this"


def _raise_in(model, exc):
    def fn(name, module, t):
        if name == "blocks.2.proj":
            raise exc
    with input_hooks(select_modules(model, "*"), fn):
        model(_x())


@pytest.mark.parametrize("exc", [ValueError("bad scale"), TypeError("bad dtype"), RuntimeError("oops"),
                                 ZeroDivisionError("zero")])
def test_a_hook_error_is_reraised_with_the_module_name_and_same_type(exc):
    model = _net()
    with pytest.raises(type(exc)) as e:
        _raise_in(model, exc)
    assert type(e.value) is type(exc)
    assert str(e.value) == f"blocks.2.proj: {exc}"
    assert e.value.__cause__ is exc
    _no_hooks(model)


@pytest.mark.parametrize("exc,shown", [(NeedsTwo(7, "detail"), "NeedsTwo: code 7: detail"),
                                       (FixedMessage("x"), "FixedMessage: always this")])
def test_a_hook_error_that_cannot_be_rebuilt_becomes_a_hook_error(exc, shown):
    model = _net()
    with pytest.raises(HookError) as e:
        _raise_in(model, exc)
    assert str(e.value) == f"blocks.2.proj: {shown}"
    assert e.value.__cause__ is exc
    assert isinstance(e.value, RuntimeError)
    _no_hooks(model)


def test_a_hook_error_already_naming_the_module_is_not_named_twice():
    model = _net()
    exc = ValueError("blocks.2.proj: already named")
    with pytest.raises(ValueError) as e:
        _raise_in(model, exc)
    assert e.value is exc


def test_a_module_without_a_tensor_input_is_a_hook_error_naming_it():
    m = KwModule()
    with input_hooks({"layers.3.attn": m}, lambda n, mod, x: None):
        with pytest.raises(HookError, match=r"layers\.3\.attn: cannot tell which argument .*\['a', 'b'\]"):
            m(a=torch.ones(1), b=torch.ones(1))
        with pytest.raises(HookError, match=r"layers\.3\.attn: the input is a list, not a tensor"):
            m([1.0, 2.0])
    _no_hooks(m)


# =============================================================================================
# find_input and same_tensor
# =============================================================================================
def test_find_input_positional_and_keywords():
    a, b, c = torch.ones(1), torch.zeros(1), torch.full((1,), 2.0)
    assert find_input("m", (a, b), {"x": c}) == (a, 0)  # the first positional argument wins
    for key in ("input", "hidden_states", "x"):
        x, slot = find_input("m", (), {key: a, "mask": b})
        assert x is a and slot == key
    # the named keywords come first, in this order, before any other tensor keyword
    assert find_input("m", (), {"x": c, "hidden_states": b, "input": a, "y": a})[1] == "input"
    assert find_input("m", (), {"x": c, "hidden_states": b})[1] == "hidden_states"
    # else the only tensor keyword (other keywords may be anything)
    x, slot = find_input("m", (), {"feats": c, "scale": 2.0, "mask": None})
    assert x is c and slot == "feats"


def test_find_input_ambiguous_or_missing():
    a, b = torch.ones(1), torch.zeros(1)
    with pytest.raises(HookError, match=r"^mod: cannot tell which argument is the input \(keywords \['p', 'q'\]\)$"):
        find_input("mod", (), {"q": a, "p": b})
    with pytest.raises(HookError, match=r"^mod: cannot tell .*\(keywords \[\]\)"):
        find_input("mod", (), {})
    with pytest.raises(HookError, match=r"^mod: cannot tell .*\(keywords \['scale'\]\)"):
        find_input("mod", (), {"scale": 2.0})
    with pytest.raises(HookError, match="^mod: the input is a NoneType, not a tensor$"):
        find_input("mod", (None, a), {})
    with pytest.raises(HookError, match="^mod: the input is a float, not a tensor$"):
        find_input("mod", (), {"x": 1.0})


def test_same_tensor_identity_aliases_and_copies():
    a = torch.randn(4, 6)
    assert same_tensor(a, a)
    assert same_tensor(a, a.detach())  # an alias of the same storage, same view
    assert same_tensor(a.detach(), a)
    assert not same_tensor(a, a.clone())  # equal values, other memory
    assert not same_tensor(a, a.float().double())
    assert not same_tensor(a, a.t())  # same memory, other shape
    assert not same_tensor(a, a.as_strided((4, 6), (1, 4)))  # same memory and shape, other strides
    assert not same_tensor(a, a[:2])  # a view: same start, other shape
    sq = torch.randn(3, 3)
    assert not same_tensor(sq, sq.t())  # same memory, same shape, other strides
    assert not same_tensor(sq, sq.view(torch.int32))  # same memory, shape and strides, other dtype


def test_same_tensor_is_false_after_an_in_place_change():
    x = torch.randn(4, 6)
    # what a hook keeps: the tensor (or a detach of it) and the version it had then
    kept, version = x.detach(), x._version
    assert same_tensor(kept, x, version=version)
    x.add_(1.0)  # modified in place: the values the hook saw are gone
    assert not same_tensor(kept, x, version=version)
    # a tensor with a version counter of its own (.data) sees the change without the recorded number
    y = torch.randn(3)
    other = y.data
    assert same_tensor(other, y)
    y.mul_(2)
    assert not same_tensor(other, y)


def test_a_recorded_input_changed_in_place_between_two_modules_is_not_the_same():
    """The q/k/v pattern: two modules fed one tensor are recognised, unless a module in between
    changed that tensor in place."""

    class Shared(nn.Module):
        def __init__(self, inplace):
            super().__init__()
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)
            self.inplace = inplace

        def forward(self, x):
            q = self.q(x)
            if self.inplace:
                x.mul_(2)
            return q + self.k(x)

    for inplace in (False, True):
        model = Shared(inplace)
        verdict = []

        def fn(name, module, x):
            if name == "q":
                fn.kept = (x.detach(), x._version)
            else:
                verdict.append(same_tensor(fn.kept[0], x, version=fn.kept[1]))

        with torch.no_grad(), input_hooks(select_modules(model), fn):
            model(torch.randn(3, 4))
        assert verdict == [not inplace]
