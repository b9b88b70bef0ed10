"""Fresh, deterministic names for the tensors and ranks that passes introduce."""
from __future__ import annotations


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, else ``base1``, ``base2``...; the result joins ``taken``."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}{k}", k + 1
    taken.add(name)
    return name


def fresh_rank(base: str, taken: set[str]) -> str:
    """A new rank name; neither it nor its index variable (lowercase) may be taken."""
    name, k = base, 1
    while name in taken or name.lower() in taken:
        name, k = f"{base}{k}", k + 1
    taken |= {name, name.lower()}
    return name
