"""registry/records.py: `@record` classes behave exactly as `@dataclass(frozen=True, slots=True)` ones,
with their repr/eq/hash/setattr/delattr shared instead of generated per class."""

from __future__ import annotations

import dataclasses
import gc
import pickle
import weakref
from dataclasses import FrozenInstanceError, dataclass, field
from typing import Any

import pytest

from hostmesh.agent import authz, certproc, config, discovery, metrics, snapshot
from hostmesh.agent.l7 import outlier
from hostmesh.ca import identity
from hostmesh.registry import consul, consul_settings, http, schema
from hostmesh.registry.records import record, without_leftover_class


@record
class Point:
    x: int
    y: int = 0
    tag: str = field(default="", compare=False, repr=False)
    weight: float = field(default=1.0, hash=False)


@dataclass(frozen=True, slots=True)
class RefPoint:  # the same fields, made by dataclasses: what `record` must match
    x: int
    y: int = 0
    tag: str = field(default="", compare=False, repr=False)
    weight: float = field(default=1.0, hash=False)


@record
class Empty:
    pass


@record
class Pair:
    a: int
    b: int


@record
class Single:
    only: str


def test_repr_matches_dataclass() -> None:
    assert repr(Point(1, 2, "t", 0.5)) == repr(RefPoint(1, 2, "t", 0.5)).replace("RefPoint", "Point")
    assert repr(Empty()) == "Empty()"
    assert repr(Single("a'b")) == 'Single(only="a\'b")'


def test_equality_and_hash_follow_the_compared_and_hashed_fields() -> None:
    assert Point(1, 2, "a") == Point(1, 2, "b")  # tag: compare=False
    assert Point(1, 2) != Point(1, 3)
    assert Point(1, 2, weight=1.0) != Point(1, 2, weight=2.0)  # weight is compared, not hashed
    assert hash(Point(1, 2, "a", 1.0)) == hash(Point(1, 2, "b", 2.0))
    assert Empty() == Empty() and hash(Empty()) == hash(Empty())
    assert Single("x") == Single("x") and hash(Single("x")) == hash(Single("x"))
    assert Single("x") != Single("y")
    # only instances of the same class compare equal, as with dataclasses (even with equal fields)
    assert Pair(1, 2) != (1, 2)
    assert Point(1, 2) != RefPoint(1, 2)
    assert len({Pair(1, 2), Pair(1, 2), Pair(2, 1)}) == 2


def test_frozen_and_slotted() -> None:
    p = Point(1)
    with pytest.raises(FrozenInstanceError, match="cannot assign to field 'x'"):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError, match="cannot delete field 'x'"):
        del p.x  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        p.other = 1  # type: ignore[attr-defined]
    assert not hasattr(p, "__dict__") and Point.__slots__ == ("x", "y", "tag", "weight")


def test_dataclass_helpers_and_pickle_work() -> None:
    p = Point(1, 2, "t")
    assert dataclasses.is_dataclass(p)
    assert [f.name for f in dataclasses.fields(p)] == ["x", "y", "tag", "weight"]
    assert dataclasses.replace(p, y=5) == Point(1, 5)
    assert dataclasses.asdict(p) == {"x": 1, "y": 2, "tag": "t", "weight": 1.0}
    assert pickle.loads(pickle.dumps(p)) == p


def test_a_class_with_its_own_method_is_refused() -> None:
    with pytest.raises(TypeError, match="defines __repr__"):

        @record
        class Custom:
            x: int

            def __repr__(self) -> str:
                return "custom"


def test_the_agents_records_share_their_methods() -> None:
    """The memory point: no per-class generated repr/eq/hash/setattr/delattr in the documents,
    config, snapshot, Consul and other records an agent imports (~9 KiB each, ~60 classes)."""
    classes = [
        obj
        for mod in (
            schema,
            identity,
            config,
            snapshot,
            consul,
            consul_settings,
            discovery,
            metrics,
            outlier,
            certproc,
            authz,
        )
        for obj in vars(mod).values()
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == mod.__name__
    ]
    assert len(classes) >= 60
    for name in ("__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__"):
        shared = {getattr(cls, name) for cls in classes}
        assert len(shared) == 1, (name, sorted(cls.__qualname__ for cls in classes))


def _first_class_freed(decorate: Any) -> bool:
    """Whether the class a slotted dataclass is rebuilt from is freed once `decorate` is done."""
    firsts: list[weakref.ref[type]] = []

    def remember(cls: type) -> type:
        firsts.append(weakref.ref(cls))
        return cls

    made = decorate(remember(type("Point", (), {"__annotations__": {"x": "int"}})))
    gc.collect()
    assert made(1).x == 1
    return firsts[0]() is None


def test_the_class_a_record_is_rebuilt_from_is_freed() -> None:
    """A plain frozen dataclass's generated __setattr__ keeps its first class (on every 3.11), and on
    Debian's 3.11.2 the copied __weakref__ descriptor does too: ~7.5 KiB per class, ~60 classes."""
    assert not _first_class_freed(dataclass(frozen=True, slots=True))
    assert _first_class_freed(record)


def test_a_slotted_dataclass_lets_its_first_class_go() -> None:
    assert _first_class_freed(lambda cls: without_leftover_class(dataclass(slots=True)(cls)))
    for cls in (http.Request, http.Response):
        assert "__weakref__" not in cls.__dict__, cls
        assert dataclasses.is_dataclass(cls)
