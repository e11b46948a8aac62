"""A name -> factory registry shared by models, datasets and methods."""

from __future__ import annotations

import fnmatch
from typing import Callable, Generic, Iterator, TypeVar

from kdbench.errors import KdbenchError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries; unknown names raise a one-line error that lists the valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str | None = None) -> Callable[[T], T]:
        def register(entry: T) -> T:
            return self.add(name or entry.__name__, entry)

        return register

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KdbenchError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        return [n for n in self._entries if fnmatch.fnmatchcase(n, pattern)]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
