"""Device memory accounting in 2 MiB pages, split between prewarmed weights and KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field

PAGE_BYTES = 2 * 1024 * 1024


def pages(n_bytes: int) -> int:
    return -(-n_bytes // PAGE_BYTES)


@dataclass
class MemoryPool:
    """Pages handed out by role and owner. Over-commit is refused, never silently allowed."""

    budget_bytes: int
    weights: dict[str, int] = field(default_factory=dict)  # model -> pages
    kv: dict[str, int] = field(default_factory=dict)  # model -> pages
    # model -> pages of a dropped copy whose engine failed to unload: the memory may still be held, so it
    # stays charged until an unload of that model succeeds
    stranded: dict[str, int] = field(default_factory=dict)

    @property
    def total_pages(self) -> int:
        return self.budget_bytes // PAGE_BYTES

    @property
    def free_pages(self) -> int:
        return self.total_pages - sum(self.weights.values()) - sum(self.kv.values()) - sum(self.stranded.values())

    def free_bytes(self) -> int:
        return self.free_pages * PAGE_BYTES

    def bytes_of(self, role: dict[str, int]) -> int:
        return sum(role.values()) * PAGE_BYTES

    def fits(self, n_bytes: int) -> bool:
        return pages(n_bytes) <= self.free_pages

    def take(self, role: dict[str, int], owner: str, n_bytes: int) -> None:
        need = pages(n_bytes)
        if need > self.free_pages:
            raise MemoryError(f"need {need} pages, {self.free_pages} free")
        role[owner] = role.get(owner, 0) + need

    def give_back(self, role: dict[str, int], owner: str) -> int:
        return role.pop(owner, 0) * PAGE_BYTES

    def strand(self, owner: str) -> int:
        """Move ``owner``'s weight and KV pages to ``stranded``; returns the bytes moved."""
        n = self.weights.pop(owner, 0) + self.kv.pop(owner, 0)
        if n:
            self.stranded[owner] = self.stranded.get(owner, 0) + n
        return n * PAGE_BYTES
