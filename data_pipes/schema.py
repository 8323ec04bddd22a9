"""The on-disk layout of a training data set, shared by converters, the generator and the reader.

A data set is a directory::

    DATASET/
      metadata.json          # DatasetMeta below
      transform/             # the feature transform that encoded the rows (data_pipes.transform)
      train/part-00000.parquet ...
      valid/part-00000.parquet ...
      test/part-00000.parquet ...

Every Parquet file has the columns ``label`` (float32, 0 or 1), one float32 column per dense
feature and one column per sparse feature, either ``int64`` (one id per row) or
``list<int64>`` (a multi-hot bag). Ids of a sparse feature lie in ``[0, cardinality)``.

Example:
    >>> meta = DatasetMeta.load("data/synthetic")        # doctest: +SKIP
    >>> meta.sparse_names()[:2], meta.cardinalities()["C1"]  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from data_pipes.errors import DataError
from mlet_torchrec.errors import InputNotFound
from mlet_torchrec.io import atomic_write_text
from mlet_torchrec.names import UnsafeName, check_name, check_relative, path_inside

METADATA_FILE = "metadata.json"
LABEL_COLUMN = "label"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
TRANSFORM_DIR = "transform"


class SparseFeature(BaseModel):
    """One categorical feature: its column name, the number of distinct ids, and whether rows hold bags."""

    model_config = ConfigDict(extra="forbid")

    name: str
    cardinality: int = Field(gt=0)
    multi_hot: bool = False

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return check_name(v, "sparse feature name")  # its table's name ends up in file names (export)


class DatasetMeta(BaseModel):
    """What a trainer needs to know about a data set without reading its rows."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    label: str = LABEL_COLUMN
    dense: list[str] = Field(default_factory=list)
    sparse: list[SparseFeature]
    # split name -> Parquet files relative to the data set directory
    splits: dict[str, list[str]]
    rows: dict[str, int] = Field(default_factory=dict)
    # free-form provenance: generator parameters, source files, converter options
    source: dict[str, object] = Field(default_factory=dict)

    @field_validator("splits")
    @classmethod
    def _relative_files(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for split, files in v.items():
            check_name(split, "split name")
            for f in files:
                check_relative(f, f"split {split!r} file")
        return v

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"format_version {v} is not supported (this reader knows {FORMAT_VERSION})")
        return v

    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    def cardinalities(self) -> dict[str, int]:
        return {f.name: f.cardinality for f in self.sparse}

    def files(self, root: Path | str, split: str) -> list[Path]:
        if split not in self.splits:
            raise KeyError(f"data set {root} has no split {split!r}; it has {sorted(self.splits)}")
        return [path_inside(root, f, f"split {split!r} file") for f in self.splits[split]]

    def arrow_schema(self) -> pa.Schema:
        """The exact Parquet schema every file of this data set must have."""
        fields = [pa.field(self.label, pa.float32())]
        fields += [pa.field(n, pa.float32()) for n in self.dense]
        fields += [pa.field(f.name, pa.list_(pa.int64()) if f.multi_hot else pa.int64()) for f in self.sparse]
        return pa.schema(fields)

    @classmethod
    def load(cls, root: Path | str) -> DatasetMeta:
        path = Path(root) / METADATA_FILE
        if not path.is_file():
            raise InputNotFound(f"{path}: no {METADATA_FILE}; is {root} a converted data set?")
        try:
            return cls.model_validate_json(path.read_text())
        except UnsafeName as e:
            raise DataError(f"{path}: {e}") from e
        except ValueError as e:
            raise DataError(f"{path}: invalid data set metadata: {e}") from e

    def save(self, root: Path | str) -> Path:
        """Write metadata.json atomically (temporary file, then rename)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        path = root / METADATA_FILE
        atomic_write_text(path, self.model_dump_json(indent=2))
        return path


def table_name(feature: str) -> str:
    """Name of the embedding table of a sparse feature (one table per feature)."""
    return f"t_{feature}"


__all__ = [
    "DatasetMeta",
    "SparseFeature",
    "METADATA_FILE",
    "LABEL_COLUMN",
    "SPLITS",
    "TRANSFORM_DIR",
    "table_name",
]
