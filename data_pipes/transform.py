"""The feature transform: everything needed to turn a raw row into model inputs, saved as an artifact.

One :class:`FeatureTransform` is shared by ``mlet convert`` (it writes one into every data set, or reuses one
with ``--features-from``), ``mlet predict`` and the HTTP server, so a raw value gets the same id everywhere.
On disk it is a directory (``DATASET/transform/``; collapse and export dirs carry a copy)::

    transform/
      transform.json        # TransformManifest: format + version, raw columns and types, label rule,
                            # dense transforms, per sparse feature its mode, cardinality, OOV id, files + sha256
      vocab/000.keys.npy    # uint64 value hashes, sorted (data_pipes.hashing.hash_strings)
      vocab/000.ids.npy     # int32/int64 id of each key (1..V; 0 is the OOV id)

Vocabularies are plain ``.npy`` arrays (12 bytes per value with int32 ids), loaded memory-mapped
(``np.load(mmap_mode="r", allow_pickle=False)``), so lookups page in only what they touch. Each file's sha256
is checked when loaded unless ``verify=False`` (``benchmarks/transform_load.py``, 10M values, 120 MB: 3-5 ms
unchecked, 0.3-1.1 s checked on a shared 2-core machine). Hashed features store only their bucket count.
:attr:`FeatureTransform.identity` is the sha256 of the manifest (which holds every file's sha256): two
transforms with the same identity encode every row alike.

A run directory holds no copy but a pointer, ``transform-ref.json`` (``{"identity", "path"}``), that
:meth:`FeatureTransform.load` follows and checks.

Raw column types: ``label`` (the label's source, ignored by :meth:`~FeatureTransform.encode`), ``number``
(a dense feature), ``token`` (a categorical value), ``token_seq`` (whitespace-separated tokens: a multi-hot
bag; an empty one is the bag ``[""]``), ``hour`` (``YYMMDDHH``, derived into ``hour_of_day`` and ``weekday``)
and ``ignored``.

Example:
    >>> t = FeatureTransform.load("data/criteo")                      # doctest: +SKIP
    >>> enc = t.encode([{"I1": "3", "C1": "68fd1e64"}, {"C2": "x"}])   # doctest: +SKIP
    >>> enc.dense.shape, enc.sparse.shape                             # doctest: +SKIP
    ((2, 13), (2, 26))
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_pipes.convert.checks import BlockChecker, DenseTransform, IssueCounter, dense_feature, parse_hour, token_bags
from data_pipes.convert.vocab import OOV_ID, Encoder, HashEncoder, Vocabulary
from data_pipes.errors import DataError
from data_pipes.schema import TRANSFORM_DIR
from mlet_torchrec.errors import InputNotFound
from mlet_torchrec.io import atomic_write_text

MANIFEST_FILE = "transform.json"
REF_FILE = "transform-ref.json"
VERSION = 1
HASH_FUNCTION = "data_pipes.hashing.hash_strings/1"

RawType = Literal["label", "number", "token", "token_seq", "hour", "ignored"]
Derived = Literal["hour_of_day", "weekday"]
_VOCAB_FILE = re.compile(r"^vocab/[0-9]{3,6}\.(keys|ids)\.npy$")
_CHUNK = 1 << 22


class RawColumn(BaseModel):
    """One column of the raw input, by the name the raw files give it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    type: RawType


class LabelSpec(BaseModel):
    """Where the label comes from: ``column`` and the rule (e.g. ``"0 or 1"``, ``"rating >= 4"``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    column: str
    rule: str


class DenseSpec(BaseModel):
    """One dense feature: ``log(1 + max(x, clip_min))`` of a ``number`` column (see :class:`DenseTransform`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    column: str
    log1p: bool = True
    clip_min: float = 0.0
    fill: float = 0.0

    @property
    def transform(self) -> DenseTransform:
        return DenseTransform(log1p=self.log1p, clip_min=self.clip_min, fill=self.fill)


class SparseSpec(BaseModel):
    """One categorical feature: its source column (or the value derived from it) and its id mapping."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    column: str
    derive: Derived | None = None
    multi_hot: bool = False
    mode: Literal["vocabulary", "hashing"]
    cardinality: int = Field(ge=1)
    oov_id: int = OOV_ID
    buckets: int | None = None
    min_count: int | None = None
    distinct_in_train: int | None = None
    oov_occurrences_in_train: int | None = None
    keys_file: str | None = None
    keys_sha256: str | None = None
    ids_file: str | None = None
    ids_sha256: str | None = None


class TransformManifest(BaseModel):
    """``transform.json``: the whole transform but the vocabulary arrays (named with their sha256)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: Literal["mlet-feature-transform"] = "mlet-feature-transform"
    version: int = VERSION
    hash_function: str = HASH_FUNCTION
    dataset: str
    raw_columns: list[RawColumn]
    label: LabelSpec | None
    dense: list[DenseSpec]
    sparse: list[SparseSpec]


@dataclass(frozen=True)
class SparseSource:
    """What a converter says of one categorical feature before it has ids: its column and shape."""

    name: str
    column: str
    derive: str | None = None  # a Derived name
    multi_hot: bool = False


@dataclass
class EncodedRows:
    """Model inputs of ``B`` raw rows.

    ``dense``: float32 ``(B, n_dense)``; ``sparse``: int64 ``(B, len(sparse_names))``, one id per row of each
    single-valued feature (all of them unless the transform has bags); ``bags``: per multi-hot feature
    ``(lengths (B,), ids)``. :meth:`jagged` gives the KeyedJaggedTensor layout of any feature order.
    """

    dense: np.ndarray
    sparse: np.ndarray
    sparse_names: list[str]
    bags: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    def jagged(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(lengths, values)`` int64, feature-major over ``names`` (a KeyedJaggedTensor's layout)."""
        index = {n: i for i, n in enumerate(self.sparse_names)}
        lengths, values = [], []
        for n in names:
            if n in self.bags:
                ln, ids = self.bags[n]
                lengths.append(ln)
                values.append(ids)
            else:
                lengths.append(np.ones(len(self), np.int64))
                values.append(self.sparse[:, index[n]])
        if not lengths:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(lengths).astype(np.int64), np.concatenate(values).astype(np.int64)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _save_array(root: Path, rel: str, arr: np.ndarray) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
    return file_sha256(path)


def _load_array(root: Path, rel: str | None, sha: str | None, dtypes: tuple[str, ...], verify: bool) -> np.ndarray:
    where = f"{root / MANIFEST_FILE}"
    if rel is None or sha is None or not _VOCAB_FILE.match(rel):
        raise DataError(f"{where}: a vocabulary file is missing or not named vocab/NNN.keys|ids.npy ({rel!r})")
    path = root / rel
    if not path.is_file():
        raise DataError(f"{path}: missing (the transform at {root} is incomplete)")
    if verify and file_sha256(path) != sha:
        raise DataError(f"{path}: sha256 differs from {MANIFEST_FILE} (the file was changed or damaged)")
    try:
        arr: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a NumPy array file ({e})") from None
    if arr.ndim != 1 or arr.dtype.str.lstrip("<>=|") not in dtypes:
        raise DataError(f"{path}: expected a 1-d array of {'/'.join(dtypes)}, got {arr.dtype} {arr.shape}")
    return arr


def _encoder_spec(src: SparseSource, enc: Encoder) -> dict[str, object]:
    spec: dict[str, object] = dict(name=src.name, column=src.column, derive=src.derive, multi_hot=src.multi_hot)
    spec["cardinality"] = enc.cardinality
    if isinstance(enc, HashEncoder):
        return {**spec, "mode": "hashing", "buckets": enc.buckets}
    return {
        **spec,
        "mode": "vocabulary",
        "min_count": enc.min_count,
        "distinct_in_train": enc.distinct,
        "oov_occurrences_in_train": enc.dropped_values,
    }


class FeatureTransform:
    """Raw rows -> model inputs (see the module docstring). Build with :meth:`from_encoders` or :meth:`load`."""

    def __init__(self, manifest: TransformManifest, encoders: Mapping[str, Encoder]) -> None:
        self.manifest = manifest
        self.encoders = dict(encoders)
        blob = json.dumps(manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        self.identity = hashlib.sha256(blob.encode()).hexdigest()

    # ---- what it is -------------------------------------------------------------------------------
    @property
    def dataset(self) -> str:
        return self.manifest.dataset

    @property
    def dense_names(self) -> list[str]:
        return [d.name for d in self.manifest.dense]

    @property
    def sparse_names(self) -> list[str]:
        return [s.name for s in self.manifest.sparse]

    @property
    def multi_hot_names(self) -> list[str]:
        return [s.name for s in self.manifest.sparse if s.multi_hot]

    @property
    def raw_columns(self) -> list[str]:
        return [c.name for c in self.manifest.raw_columns]

    def cardinalities(self) -> dict[str, int]:
        return {s.name: s.cardinality for s in self.manifest.sparse}

    def __repr__(self) -> str:
        return (
            f"FeatureTransform({self.dataset}: {len(self.dense_names)} dense, {len(self.sparse_names)} sparse, "
            f"identity {self.identity[:12]})"
        )

    # ---- building, saving, loading ----------------------------------------------------------------
    @classmethod
    def from_encoders(
        cls,
        dataset: str,
        raw_columns: Sequence[RawColumn],
        label: LabelSpec | None,
        dense: Sequence[DenseSpec],
        sparse: Sequence[tuple[SparseSource, Encoder]],
    ) -> FeatureTransform:
        """A transform from a converter's encoders (vocabulary files are named when it is saved)."""
        specs = [SparseSpec.model_validate(_encoder_spec(src, enc)) for src, enc in sparse]
        manifest = TransformManifest(
            dataset=dataset, raw_columns=list(raw_columns), label=label, dense=list(dense), sparse=specs
        )
        return cls(manifest, {src.name: enc for src, enc in sparse})

    def save(self, directory: Path | str) -> FeatureTransform:
        """Write the transform into ``directory`` (created; a fresh one inside an atomic output);
        returns the saved transform, whose manifest names the files and their sha256."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        specs = []
        for i, spec in enumerate(self.manifest.sparse):
            enc = self.encoders[spec.name]
            if isinstance(enc, Vocabulary):
                id_type = np.int32 if spec.cardinality < 2**31 else np.int64
                keys, ids = f"vocab/{i:03d}.keys.npy", f"vocab/{i:03d}.ids.npy"
                files = dict(
                    keys_file=keys,
                    keys_sha256=_save_array(root, keys, np.asarray(enc.keys, np.uint64)),
                    ids_file=ids,
                    ids_sha256=_save_array(root, ids, np.asarray(enc.ids).astype(id_type)),
                )
                spec = spec.model_copy(update=files)
            specs.append(spec)
        manifest = self.manifest.model_copy(update={"sparse": specs})
        atomic_write_text(root / MANIFEST_FILE, manifest.model_dump_json(indent=1) + "\n")
        return FeatureTransform(manifest, self.encoders)

    @staticmethod
    def locate(path: Path | str) -> Path:
        """The transform directory of a data set, collapse or export dir, a run (its pointer) or itself."""
        p = Path(path)
        if (p / MANIFEST_FILE).is_file():
            return p
        if (p / TRANSFORM_DIR / MANIFEST_FILE).is_file():
            return p / TRANSFORM_DIR
        if (p / REF_FILE).is_file():
            return read_ref(p)[1]
        if not p.exists():
            raise InputNotFound(f"{p}: no such file or directory")
        raise InputNotFound(
            f"{p}: no feature transform ({TRANSFORM_DIR}/{MANIFEST_FILE}): only a data set made by `mlet convert` "
            "has one (not one from `mlet synth`, nor one converted before transforms existed), and so do the runs, "
            "collapse outputs and exports trained on it"
        )

    @classmethod
    def load(cls, path: Path | str, verify: bool = True) -> FeatureTransform:
        """Load a transform (see :meth:`locate`); vocabularies are memory-mapped, checked against their
        sha256 unless ``verify=False``. A run's pointer is followed and its identity checked."""
        p = Path(path)
        root = cls.locate(p)
        manifest_path = root / MANIFEST_FILE
        try:
            manifest = TransformManifest.model_validate_json(manifest_path.read_bytes())
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise DataError(
                f"{manifest_path}: not a version-{VERSION} feature transform ({where}: {first['msg']})"
            ) from None
        encoders: dict[str, Encoder] = {}
        for spec in manifest.sparse:
            if spec.mode == "hashing":
                if spec.buckets is None or spec.buckets != spec.cardinality:
                    raise DataError(f"{manifest_path}: feature {spec.name}: hashing needs buckets == cardinality")
                encoders[spec.name] = HashEncoder(spec.buckets)
                continue
            keys = _load_array(root, spec.keys_file, spec.keys_sha256, ("u8",), verify)
            ids = _load_array(root, spec.ids_file, spec.ids_sha256, ("i4", "i8"), verify)
            if len(keys) != len(ids) or len(keys) + 1 != spec.cardinality:
                raise DataError(f"{manifest_path}: feature {spec.name}: vocabulary sizes disagree with its cardinality")
            encoders[spec.name] = Vocabulary(
                keys=keys,
                ids=ids,
                distinct=spec.distinct_in_train or 0,
                min_count=spec.min_count or 1,
                dropped_values=spec.oov_occurrences_in_train or 0,
            )
        out = cls(manifest, encoders)
        if (p / REF_FILE).is_file() and not (p / MANIFEST_FILE).is_file():
            expected = read_ref(p)[0]
            if expected != out.identity:
                raise DataError(
                    f"{p / REF_FILE}: the transform at {root} has identity {out.identity[:12]}, the run was "
                    f"trained with {expected[:12]} (its data set was converted again or replaced)"
                )
        return out

    # ---- encoding ---------------------------------------------------------------------------------
    def _columns(self, rows: Sequence[Mapping[str, str]]) -> dict[str, pa.Array]:
        known = set(self.raw_columns)
        for i, row in enumerate(rows):
            for k, v in row.items():
                if k not in known:
                    shown = ", ".join(self.raw_columns[:8]) + (", ..." if len(known) > 8 else "")
                    raise DataError(
                        f"row {i}: unknown column {str(k)[:60]!r} (the {self.dataset} transform reads {shown})"
                    )
                if not isinstance(v, str):
                    shown = json.dumps(v)[:40]
                    raise DataError(f"row {i}, column {k}: {shown} is not a string (send raw values as strings)")
        return {c: pa.array([row.get(c) or None for row in rows], pa.string()) for c in known}

    def encode(self, rows: Sequence[Mapping[str, str]]) -> EncodedRows:
        """Encode raw rows (column -> the value as written in the raw file; a missing key is an empty field).

        Unknown columns and bad values (a dense value that is no number, a bad hour) raise a one-line
        :class:`DataError` naming the row (0-based) and column; unseen categorical values get the OOV id 0.
        """
        n = len(rows)
        cols = self._columns(rows)
        check = BlockChecker("features", first_line=0, n=n, lenient=False, issues=IssueCounter())
        dense = [dense_feature(cols[d.column], d.column, check, d.transform) for d in self.manifest.dense]
        hours: dict[str, tuple[pa.Array, pa.Array, np.ndarray]] = {}
        single: list[np.ndarray] = []
        bags: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for spec in self.manifest.sparse:
            values = cols[spec.column]
            oov = None
            if spec.derive is not None:
                if spec.column not in hours:
                    hours[spec.column] = parse_hour(values, check)
                hod, wd, oov = hours[spec.column]
                values = hod if spec.derive == "hour_of_day" else wd
            enc = self.encoders[spec.name]
            if spec.multi_hot:
                b = token_bags(values)
                bags[spec.name] = (
                    pc.list_value_length(b).to_numpy(zero_copy_only=False).astype(np.int64),
                    enc.encode(b),
                )
                continue
            ids = enc.encode(values).astype(np.int64)
            if oov is not None:
                ids[oov] = spec.oov_id
            single.append(ids)
        check.finish()
        return EncodedRows(
            dense=np.stack(dense, axis=1) if dense else np.zeros((n, 0), np.float32),
            sparse=np.stack(single, axis=1) if single else np.zeros((n, 0), np.int64),
            sparse_names=[s.name for s in self.manifest.sparse if not s.multi_hot],
            bags=bags,
        )


def carry_transform(source: Path | str, directory: Path | str) -> str | None:
    """Save the transform of ``source`` (see :meth:`FeatureTransform.locate`) into ``directory/transform``
    (collapse and export outputs carry one); its identity, or None when ``source`` has none."""
    try:
        t = FeatureTransform.load(source)
    except InputNotFound:
        return None
    return t.save(Path(directory) / TRANSFORM_DIR).identity


def dataset_identity(path: Path | str) -> str | None:
    """The identity of a data set's transform; None for one converted before transforms (or generated)."""
    if not (Path(path) / TRANSFORM_DIR / MANIFEST_FILE).is_file():
        return None
    return FeatureTransform.load(path).identity


def write_ref(directory: Path | str, transform_path: Path | str, identity: str) -> None:
    """Record in ``directory`` (a run) which transform it was trained with: a pointer, not a copy."""
    ref = {"identity": identity, "path": str(Path(transform_path).absolute())}
    atomic_write_text(Path(directory) / REF_FILE, json.dumps(ref, indent=1) + "\n")


def _parse_ref(path: Path) -> tuple[str, Path]:
    try:
        ref = json.loads(path.read_text())
        return str(ref["identity"]), Path(str(ref["path"]))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a transform pointer ({e})") from None


def ref_identity(directory: Path | str) -> str | None:
    """The identity a run's pointer records (None: the run has none), whether or not its data set is still there."""
    path = Path(directory) / REF_FILE
    return _parse_ref(path)[0] if path.is_file() else None


def read_ref(directory: Path | str) -> tuple[str, Path]:
    """``(identity, transform dir)`` of a run's pointer."""
    path = Path(directory) / REF_FILE
    identity, target = _parse_ref(path)
    if (target / TRANSFORM_DIR / MANIFEST_FILE).is_file():
        target = target / TRANSFORM_DIR
    if not (target / MANIFEST_FILE).is_file():
        raise InputNotFound(f"{path}: the transform it names, {target}, is gone")
    return identity, target


__all__ = [
    "MANIFEST_FILE",
    "REF_FILE",
    "TRANSFORM_DIR",
    "DenseSpec",
    "EncodedRows",
    "FeatureTransform",
    "LabelSpec",
    "RawColumn",
    "SparseSource",
    "SparseSpec",
    "TransformManifest",
    "carry_transform",
    "dataset_identity",
    "read_ref",
    "ref_identity",
    "write_ref",
]
