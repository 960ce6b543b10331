"""`record`: a frozen, slotted dataclass whose `__repr__`, `__eq__`, `__hash__`, `__setattr__` and
`__delattr__` are shared by every such class instead of generated for each.

Decision: `@dataclass(frozen=True, slots=True)` compiles five methods per class from generated
source (plus a recursion guard around `__repr__`): ~9 KiB of code and function objects per class,
which every agent keeps for the documents, config and Consul records it may never compare or print
(the agent holds ~60 such classes: 0.5 MiB of its idle RSS). Here dataclasses still makes `__init__`
(it runs once per parse, so it stays specialised), and each class gets two `operator.attrgetter`s
(its compared and its hashed fields, C objects) that the shared methods use: the same results as
the generated ones (repr text, equality only between instances of the same class, hash over the
hashed fields, FrozenInstanceError on assignment), with equality and hashing in C rather than in
generated Python. `dataclasses.fields`/`replace`/`asdict` and pickling work as on any dataclass.

`without_leftover_class` is the other half of the saving on the interpreter the .deb runs on
(Debian 12's Python 3.11.2): there `dataclass(slots=True)` builds the slotted class from a copy of
the first class's dict, `__weakref__` descriptor included (CPython gh-102069, fixed in 3.11.3), and
that descriptor keeps the whole first class alive, ~7.5 KiB a class.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import FrozenInstanceError, dataclass, field, fields
from typing import Any, TypeVar, dataclass_transform

_T = TypeVar("_T")
_OWN = ("__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__")  # what `record` provides


def _key(names: tuple[str, ...]) -> Callable[[Any], Any]:
    """The tuple of `names` of an instance, in C (attrgetter of one name returns the bare value:
    same equality, and a hash consistent with it, which is all a hash must be)."""
    return operator.attrgetter(*names) if names else _empty


def _empty(_obj: Any) -> tuple[()]:
    return ()


def _repr(self: Any) -> str:
    values = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__record_repr__)
    return f"{type(self).__qualname__}({values})"


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is self.__class__:
        key = self.__record_eq__
        return key(self) == key(other)
    return NotImplemented


def _hash(self: Any) -> int:
    return hash(self.__record_hash__(self))


def _setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def without_leftover_class(cls: type[_T]) -> type[_T]:
    """Drop the first class's `__weakref__` descriptor that Python 3.11.2 copies into a slotted
    dataclass (see the module docstring), so that class is freed. Instances lose nothing: a class
    whose `__slots__` lacks `__weakref__` has no weak references, and the copied descriptor only
    raised TypeError on them. For a non-frozen `@dataclass(slots=True)` an agent process holds
    (registry/http's Request and Response); `record` does it for its classes, and replaces the
    generated `__setattr__` that keeps a plain frozen one's first class on any 3.11. Classes in
    mypyc-compiled modules are native and need neither."""
    stale = cls.__dict__.get("__weakref__")
    if stale is not None and getattr(stale, "__objclass__", cls) is not cls:
        type.__delattr__(cls, "__weakref__")
    return cls


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: type[_T]) -> type[_T]:
    """`@dataclass(frozen=True, slots=True)` with the shared methods above (see the module docstring).
    A class that defines one of them itself is refused: use a plain dataclass for it."""
    own = [
        name
        for name in _OWN
        if name in cls.__dict__ and not (name == "__hash__" and cls.__dict__[name] is None)
    ]
    if own:
        raise TypeError(f"@record {cls.__qualname__} defines {', '.join(own)}: use @dataclass for it")
    cls = without_leftover_class(dataclass(frozen=True, slots=True, repr=False, eq=False)(cls))
    fs = fields(cls)  # type: ignore[arg-type]  # a dataclass now
    compared = tuple(f.name for f in fs if f.compare)
    hashed = tuple(f.name for f in fs if (f.compare if f.hash is None else f.hash))
    for name, value in (
        ("__record_repr__", tuple(f.name for f in fs if f.repr)),
        ("__record_eq__", staticmethod(_key(compared))),
        ("__record_hash__", staticmethod(_key(hashed))),
        ("__repr__", _repr),
        ("__eq__", _eq),
        ("__hash__", _hash),
        ("__setattr__", _setattr),  # replaces dataclasses' generated pair; __init__ bypasses them
        ("__delattr__", _delattr),
    ):
        type.__setattr__(cls, name, value)
    return cls
