"""DCP checkpoints read as data, never as code.

``torch.distributed.checkpoint`` unpickles ``<dir>/.metadata`` with plain :mod:`pickle` and its default
load planner ``torch.load(weights_only=False)``-s every non-tensor entry, so a crafted checkpoint, run or
collapse directory would run code in whoever reads it. Every read of a DCP directory in mlet goes
through this module instead:

- :func:`read_metadata` unpickles ``.metadata`` with an allow-list (only the classes DCP's metadata is
  made of: its dataclasses, ``torch.Size``, dtypes, layouts, paths), caps its size and checks its shape
  (every data file a plain name inside the directory, offsets and lengths non-negative, no storage
  transforms); anything else is a one-line :class:`UnsafeCheckpoint`;
- :func:`load` is ``dcp.load`` with a reader that uses :func:`read_metadata` and a planner that loads
  non-tensor entries with ``torch.load(weights_only=True)``.

    >>> read_metadata(Path("/nonexistent"))
    Traceback (most recent call last):
    ...
    mlet_torchrec.training.safe_dcp.UnsafeCheckpoint: /nonexistent/.metadata is unreadable (FileNotFoundError)
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

from mlet_torchrec.errors import UserError
from mlet_torchrec.files import sha256_file
from mlet_torchrec.io import atomic_write_text
from mlet_torchrec.names import UnsafeName, check_name

DCP_METADATA = ".metadata"
METADATA_SHA256 = "dcp_metadata_sha256"
"""The key under which ``checkpoint.json`` and a collapse's ``manifest.json`` record the hash of ``.metadata``."""
MAX_METADATA_BYTES = 256 << 20
"""A ``.metadata`` larger than this is refused unread (a real one is kilobytes per thousand tensors)."""

_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        (_DCP_METADATA_MODULE, name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # torch.layout pickles as _get_layout("torch.strided")
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
        ("pathlib", "PurePosixPath"),
    }
    | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
)


class UnsafeCheckpoint(UserError):
    """A DCP directory whose ``.metadata`` is not plain DCP metadata (or is damaged): refused unread."""


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only the globals of :data:`_ALLOWED`; any other one (``os.system``, ``builtins.eval``,
    a project class) raises before it can be called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent reference, which DCP metadata never holds")


def _check_shape(metadata: Any) -> None:
    """Raise ``ValueError`` unless ``metadata`` is a DCP ``Metadata`` whose data files are plain names."""
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise ValueError(f"it holds a {type(metadata).__name__}, not DCP metadata")
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(item, (TensorStorageMetadata, BytesStorageMetadata)):
            raise ValueError(f"entry {key!r} is a {type(item).__name__}")
        if isinstance(item, TensorStorageMetadata):
            sizes = [*item.size, *(n for c in item.chunks for n in (*c.offsets, *c.sizes))]
            if not all(isinstance(c, ChunkStorageMetadata) for c in item.chunks) or any(
                not isinstance(n, int) or n < 0 for n in sizes
            ):
                raise ValueError(f"tensor {key!r} has a negative or non-integer size")
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise ValueError(f"storage entry {index!r} is a {type(info).__name__}")
        check_name(info.relative_path, "data file")
        if not all(isinstance(n, int) and n >= 0 for n in (info.offset, info.length)):
            raise ValueError(f"data file {info.relative_path!r} has a negative or non-integer offset or length")
        if info.transform_descriptors:
            raise ValueError(
                f"data file {info.relative_path!r} asks for storage transforms {info.transform_descriptors}"
            )


def read_metadata(checkpoint: Path | str) -> Metadata:
    """The DCP ``Metadata`` of a checkpoint directory, unpickled through the allow-list and checked.

    Raises :class:`UnsafeCheckpoint` (one line, naming the file and the reason) for a missing,
    oversized, truncated or crafted file.
    """
    path = Path(checkpoint) / DCP_METADATA
    try:
        size = path.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise UnsafeCheckpoint(f"{path}: {size} bytes is not DCP metadata (limit {MAX_METADATA_BYTES})")
        with open(path, "rb") as f:
            metadata = _AllowListUnpickler(f).load()
        _check_shape(metadata)
    except UnsafeCheckpoint:
        raise
    except OSError as e:
        raise UnsafeCheckpoint(f"{path} is unreadable ({type(e).__name__})") from None
    except UnsafeName as e:
        raise UnsafeCheckpoint(f"{path} is refused: {e}") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure: garbled, truncated or crafted
        raise UnsafeCheckpoint(f"{path} is unreadable or not plain DCP metadata: {e}") from None
    if metadata.storage_meta is None:
        metadata.storage_meta = StorageMeta()
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader, with ``.metadata`` read by :func:`read_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: mlet never writes them
            raise UnsafeCheckpoint(f"{self.path}: per-rank DCP metadata is not supported")
        metadata = read_metadata(Path(self.path))
        assert metadata.storage_meta is not None  # set by read_metadata
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, loading non-tensor entries with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load(state: dict[str, Any], checkpoint: Path | str, no_dist: bool = False) -> None:
    """``dcp.load(state, checkpoint_id=checkpoint)`` (in place), reading only data: see the module doc."""
    dcp.load(state, storage_reader=SafeReader(str(checkpoint)), planner=SafeLoadPlanner(), no_dist=no_dist)


def record_sha256(directory: Path, info_file: str) -> None:
    """Add the SHA-256 of ``directory/.metadata`` to the JSON file ``directory/info_file`` (checked on read)."""
    info = json.loads((directory / info_file).read_text())
    info[METADATA_SHA256] = sha256_file(directory / DCP_METADATA)
    atomic_write_text(directory / info_file, json.dumps(info, indent=2, default=str))
