"""The KEY's three Delta Lake tables (index, shard records, failure ledger) and the one way we commit to them.

A commit appends a small Arrow table with `write_deltalake(mode="append")`: delta-rs writes one new data file
and one log entry (a conditional put on S3, a no-replace rename locally), whatever the table already holds.
Every commit carries a unique token in its commit metadata. When the append raises (a lost response, an S3
retry answered 412, a network error after the log entry landed), we look for our token in the versions
written since we started before doing anything else: a commit that landed is recognised, never repeated and
never undone.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

TOKEN = "subsume_token"


def delta_storage_options(root: str, fsspec_options: dict[str, Any]) -> dict[str, str] | None:
    """delta-rs options for a store root. Credentials and endpoint come from the standard AWS environment
    (as for s3fs); an endpoint given to s3fs is passed on, and a plain-http endpoint is allowed explicitly."""
    if "://" not in root or root.startswith("file://"):
        return None
    out: dict[str, str] = {}
    client = fsspec_options.get("client_kwargs") or {}
    endpoint = fsspec_options.get("endpoint_url") or client.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        out["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
    for ours, theirs in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"), ("token", "AWS_SESSION_TOKEN")):
        if fsspec_options.get(ours):
            out[theirs] = str(fsspec_options[ours])
    region = client.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        out["AWS_REGION"] = region
    return out


_HANDLES_PER_THREAD = 16
_local = threading.local()
_refreshed: dict[int, float] = {}  # id(handle) -> when it last read the log (monotonic)


def _handles() -> OrderedDict:
    """This thread's open table handles (delta-rs handles are not shared between threads)."""
    if not hasattr(_local, "handles"):
        _local.handles = OrderedDict()
    return _local.handles


class LostCommit(Exception):
    """A commit that raised and whose token is in no version: it did not land (safe to retry)."""


@dataclass(frozen=True)
class DeltaLocation:
    uri: str  # for delta-rs
    options: dict[str, str] | None
    fs: Any = None  # the store's fsspec filesystem and the table's path on it (to read one log entry)
    path: str = ""

    def open(self, version: int | None = None, *, fresh: bool = False, max_age_s: float = 0.0):
        """A handle on the latest version (brought up to date by reading only the log entries since this
        thread last looked, unless it looked less than `max_age_s` ago) or on one version (immutable).
        Loading a table's state costs O(its files) once per thread; later commits and opens cost what was
        added since."""
        from deltalake import DeltaTable

        cache = _handles()
        ckey = (self.uri, version)
        table = None if fresh else cache.get(ckey)
        if table is None:
            table = DeltaTable(self.uri, version=version, storage_options=self.options)
            _refreshed[id(table)] = time.monotonic()
        elif version is None and time.monotonic() - _refreshed.get(id(table), 0.0) >= max_age_s:
            table.update_incremental()
            _refreshed[id(table)] = time.monotonic()
        cache[ckey] = table
        cache.move_to_end(ckey)
        while len(cache) > _HANDLES_PER_THREAD:
            cache.popitem(last=False)
        return table

    def forget(self) -> None:
        _handles().pop((self.uri, None), None)

    def exists(self) -> bool:
        from deltalake import DeltaTable

        if (self.uri, None) in _handles():
            return True
        return DeltaTable.is_deltatable(self.uri, storage_options=self.options)

    def create(self, schema: pa.Schema) -> None:
        """Version 0: the empty table. Two writers creating it at once both succeed or see it exists."""
        from deltalake import write_deltalake

        if self.exists():
            return
        try:
            write_deltalake(self.uri, schema.empty_table(), mode="ignore", storage_options=self.options)
        except Exception:
            if not self.exists():
                raise

    def latest_version(self, max_age_s: float = 0.0) -> int:
        return self.open(max_age_s=max_age_s).version()


def find_token(location: "DeltaLocation", token: str, after: int) -> int | None:
    """The version > `after` whose commit metadata carries `token`, if any: reads only the log entries of the
    versions written since (delta-rs's history() labels versions from the handle's loaded version, so the log
    entries are read directly)."""
    latest = location.latest_version()
    for version in range(latest, after, -1):
        if commit_metadata(location, version).get(TOKEN) == token:
            return version
    return None


def append(location: DeltaLocation, data: pa.Table, metadata: dict[str, str], *, retries: int = 5,
           write=None) -> int:
    """Append `data` as one commit; returns the version it became. Safe against lost responses (see above)."""
    from deltalake import CommitProperties

    write = write or _write_deltalake
    token = uuid.uuid4().hex
    # No refresh before writing (a listing of the log): a stale handle's commit meets the newer entries as
    # a conflict, and delta-rs, appending, moves on to the next free version.
    table = location.open(max_age_s=float("inf"))
    base = table.version()
    props = CommitProperties(custom_metadata={**metadata, TOKEN: token}, max_commit_retries=1000)
    last: Exception | None = None
    for attempt in range(retries):
        try:
            write(table, data, mode="append", commit_properties=props)
        except Exception as e:  # noqa: BLE001 - any failure may still have landed: check before retrying
            last = e
            location.forget()
            landed = find_token(location, token, base)
            if landed is not None:
                return landed
            time.sleep(min(0.1 * 2**attempt, 2.0))
            table = location.open(fresh=True)
            continue
        # delta-rs moves the handle to the version it committed: confirm by its log entry (one read)
        mine = table.version()
        if mine > base and commit_metadata(location, mine).get(TOKEN) == token:
            return mine
        landed = find_token(location, token, base)
        if landed is None:  # cannot happen with a working log store; say so rather than guess
            raise LostCommit(f"{location.uri}: commit {token} reported success but is in no version")
        return landed
    raise LostCommit(f"{location.uri}: commit failed {retries} times: {last}") from last


def _write_deltalake(table, data, **kw) -> None:
    from deltalake import write_deltalake

    write_deltalake(table, data, **kw)


def commit_metadata(location: DeltaLocation, version: int) -> dict[str, Any]:
    """The commitInfo action of one version (timestamp, operation, our custom metadata), read from that
    version's log entry alone (Delta protocol: _delta_log/<version:020d>.json, one action per line).
    delta-rs's `history()` reads from the latest version backwards, so it would cost O(versions since)."""
    import json

    from . import fsutil

    entry = fsutil.join(location.path, "_delta_log", f"{version:020d}.json")
    for line in fsutil.read_bytes(location.fs, entry).decode().splitlines():
        action = json.loads(line) if line.strip() else {}
        if "commitInfo" in action:
            return {**action["commitInfo"], "version": version}
    return {"version": version}
