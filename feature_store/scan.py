"""The one way a version of our Delta tables (index, shard records, copies, failure ledger) becomes Arrow: in the
table's declared schema (records.py, ledger.py), whatever types its Parquet files were written with.

Why not `to_pyarrow_dataset().to_table(filter=...)`: deltalake 1.6.6 writes the files a MERGE rewrites
(metadata.py) with `string_view` columns where our appends write `string` (delta-rs #4579; valid Delta data,
the same Parquet bytes, only the embedded Arrow type differs). pyarrow reads and casts such a file, but a
filter pushed into the scan is checked against the file's Parquet statistics, and pyarrow 26 has no kernel that
compares string with string_view: the scan fails. So files are pruned with the Delta log's min/max statistics,
which delta-rs attaches to each fragment typed by the table schema, and rows are filtered here, in Arrow,
after the scan has cast them to the declared schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import pyarrow as pa
import pyarrow.compute as pc

Values = Union[pa.Array, pa.ChunkedArray, list]


@dataclass(frozen=True)
class Match:
    """Rows whose `column` is one of `values` (the only filter our readers need: shards, hashes, names)."""

    column: str
    values: Values


def dataset(table: Any, schema: pa.Schema):
    """One version of a Delta table (a deltalake.DeltaTable) as a pyarrow dataset presenting `schema`."""
    return table.to_pyarrow_dataset(schema=schema)


def read(ds, columns: list[str] | None = None, where: Match | None = None) -> pa.Table:
    """`columns` (default all) of the rows matching `where` (default all), in the dataset's schema. Memory
    holds the matches and one record batch, and only files whose statistics allow a match are opened."""
    names = columns if columns is not None else ds.schema.names
    schema = pa.schema([ds.schema.field(c) for c in names])
    if where is None:
        return ds.to_table(columns=names)
    values = _value_set(where.values, ds.schema.field(where.column).type)
    if not len(values):
        return schema.empty_table()
    files = _files_that_may_match(ds, where.column, values)
    keep = [b.filter(pc.is_in(b.column(where.column), value_set=values)).select(names)
            for b in files.to_batches(columns=list(dict.fromkeys([*names, where.column])))]
    return pa.Table.from_batches([b for b in keep if b.num_rows], schema=schema)


def _value_set(values: Values, type_: pa.DataType) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return (values if isinstance(values, pa.Array) else pa.array(values, type_)).cast(type_)


def _files_that_may_match(ds, column: str, values: pa.Array):
    """The dataset narrowed to the files whose log statistics (the fragments' guarantees) admit `values`.
    Only those guarantees are consulted here, never a file's own Parquet statistics."""
    import pyarrow.dataset as pads

    fragments = list(ds.get_fragments(filter=pc.field(column).isin(values)))
    return pads.FileSystemDataset(fragments, ds.schema, ds.format, ds.filesystem)
