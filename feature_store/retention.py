"""Which versions `gc` keeps, and removing the Delta data files only expired versions needed."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tables import commit_metadata


@dataclass(frozen=True)
class Retention:
    """Versions to keep. With no rule set every version is kept (the default: gc only removes leftovers)."""

    keep_last: int | None = None  # the N latest versions
    keep_since: float | None = None  # versions committed at or after this UNIX time
    keep: tuple[int, ...] = field(default_factory=tuple)  # these versions

    @property
    def active(self) -> bool:
        return self.keep_last is not None or self.keep_since is not None or bool(self.keep)


def retained_versions(store, key: str, rule: Retention, pinned: set[int]) -> list[int]:
    """The versions a rule keeps: always the latest, and every version a live run pins."""
    latest = store.latest_version(key)
    versions = store.versions(key)
    if not rule.active:
        return versions
    keep = {latest} | set(pinned) | set(rule.keep)
    if rule.keep_last:
        keep |= set(versions[-rule.keep_last:])
    if rule.keep_since is not None:
        loc = store.tables(key).index
        keep |= {v for v in versions if commit_metadata(loc, v).get("timestamp", 0) / 1000 >= rule.keep_since}
    return sorted(v for v in keep if v in versions)


def expire_versions(store, key: str, rule: Retention, pinned: set[int], grace: float) -> list[str]:
    """Delete the index table's data files that no retained version reads (Delta vacuum with keep_versions).
    The index is append-only except for metadata updates, so this removes the rewritten files of relabelled
    videos; shards stay as long as the latest index names them. Files younger than the grace are kept."""
    if not rule.active:
        return []
    keep = retained_versions(store, key, rule, pinned)
    table = store.tables(key).index.open()
    return table.vacuum(retention_hours=max(0, int(grace // 3600)), dry_run=False, enforce_retention_duration=False,
                        keep_versions=keep)
