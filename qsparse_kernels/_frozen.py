"""``FrozenMapping``: a read-only, ordered, hashable mapping (what a frozen config can hold)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping


class FrozenMapping(Mapping):
    """An immutable copy of a mapping that keeps its order and hashes by its ordered items.

    Order is part of the value: ``QSparseConfig`` patterns match first-wins, so two mappings with
    the same items in another order are different (and unequal); compared with any other mapping
    it compares as a ``dict``. Values must be hashable for ``hash()`` to work.
    """

    __slots__ = ("_items", "_dict")

    def __init__(self, mapping: Mapping) -> None:
        self._dict = dict(mapping)
        self._items = tuple(self._dict.items())

    def __getitem__(self, key):
        return self._dict[key]

    def __iter__(self) -> Iterator:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._dict)

    def __eq__(self, other) -> bool:
        if isinstance(other, FrozenMapping):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._dict == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return repr(self._dict)
