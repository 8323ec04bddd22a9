"""Hostile input, fuzzed with hypothesis: broken Parquet files and data set metadata for the reader,
broken YAML and overrides for the config loader. Every failure must be one clear error of the
project's types (``DataError`` / ``ConfigError``, both ``UserError``s the CLI prints in one line) naming
what is wrong, never a hang, a crash or some library's exception. Examples are derandomized and bounded
so CI sees the same few hundred cases in seconds; a hang aborts the run with a stack dump."""

from __future__ import annotations

import faulthandler
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from data_pipes.errors import DataError
from data_pipes.reader import ParquetBatchReader
from data_pipes.schema import DatasetMeta
from mlet_torchrec.config import ConfigError, load_config

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(autouse=True)
def _no_hangs():
    faulthandler.dump_traceback_later(300, exit=True)  # a hang kills the run with every thread's stack
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def base(synth_dataset) -> Path:
    return synth_dataset(rows=500, row_group_size=40, row_groups_per_file=3, multi_hot_features=1, seed=4)


def _read_all(root: Path, validate: bool = True) -> int:
    """Build a reader over every split and read every batch; the number of rows read."""
    rows = 0
    for split in DatasetMeta.load(root).splits:
        reader = ParquetBatchReader(root, split, 64, drop_last=False, shuffle=True, seed=1, validate=validate)
        reader.set_epoch(1)
        reader.num_batches(2)
        for batch in reader:
            rows += batch.labels.shape[0]
    return rows


def _expect_clear(root: Path, target: Path) -> None:
    try:
        _read_all(root)
        event("read fine")
    except DataError as e:  # names the file first (pyarrow's own words may follow on further lines)
        msg = str(e)
        event(
            "DataError: " + msg[len(str(target)) :].split(":")[1].strip()[:40]
            if msg.startswith(str(target))
            else "DataError: metadata"
        )
        assert msg.startswith(str(target)) or msg.startswith(str(root / "metadata.json")), msg
        assert len(msg) < 4000, msg


def _copy(base: Path) -> Path:
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    shutil.copytree(base, work / "data")
    return work / "data"


# ------------------------------------------------------------------------------------ Parquet bytes


@FUZZ
@given(data=st.data())
def test_corrupted_parquet_bytes_fail_with_one_data_error(base, data):
    root = _copy(base)
    try:
        target = root / DatasetMeta.load(root).splits["train"][data.draw(st.integers(0, 1))]
        raw = bytearray(target.read_bytes())
        kind = data.draw(st.sampled_from(["flip", "truncate", "garbage", "zero_run", "empty"]))
        if kind == "flip":
            for _ in range(data.draw(st.integers(1, 16))):
                pos = data.draw(st.integers(0, len(raw) - 1))
                raw[pos] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        elif kind == "garbage":
            raw = bytearray(data.draw(st.binary(min_size=0, max_size=3000)))
        elif kind == "zero_run":
            a = data.draw(st.integers(0, len(raw) - 1))
            raw[a : a + data.draw(st.integers(1, 400))] = b"\0" * len(raw[a : a + 400])
        else:
            raw = bytearray()
        target.write_bytes(bytes(raw))
        _expect_clear(root, target)
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


# ---------------------------------------------------------------------------------- Parquet content


def _rewrite(path: Path, mutate) -> None:
    pf = pq.ParquetFile(path)
    groups = [pf.read_row_group(g) for g in range(pf.metadata.num_row_groups)]
    pf.close()
    groups = mutate(groups)
    if not groups:
        pq.write_table(pa.table({}), path)
        return
    with pq.ParquetWriter(path, groups[0].schema) as w:
        for t in groups:
            w.write_table(t)


def _set(table: pa.Table, name: str, values, typ) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, type=typ))


@FUZZ
@given(data=st.data())
def test_wrong_parquet_content_fails_with_one_data_error(base, data):
    root = _copy(base)
    try:
        meta = DatasetMeta.load(root)
        target = root / meta.splits[data.draw(st.sampled_from(sorted(meta.splits)))][0]
        columns = [meta.label, *meta.dense, *meta.sparse_names()]
        col = data.draw(st.sampled_from(columns))
        feature = next((f for f in meta.sparse if f.name == col), None)
        kind = data.draw(
            st.sampled_from(
                ["null", "value", "cast", "drop", "extra", "rename", "no_groups", "empty_group", "list_nulls"]
            )
        )
        group = data.draw(st.integers(0, 2))
        row = data.draw(st.integers(0, 39))
        bad_value = data.draw(
            st.sampled_from([-1, 2, 10**12, -(2**63), 2**63 - 1, float("nan"), float("inf"), 0.5, -0.0])
        )

        def mutate(groups):
            g = min(group, len(groups) - 1)
            t = groups[g]
            typ = t.schema.field(col).type
            values = t.column(col).to_pylist()
            r = min(row, len(values) - 1)
            if kind == "null":
                values[r] = None
                groups[g] = _set(t, col, values, typ)
            elif kind == "value":
                if feature is None:
                    values[r] = float(bad_value)
                elif feature.multi_hot:
                    values[r] = [int(bad_value) if isinstance(bad_value, int) else 10**6]
                else:
                    values[r] = int(bad_value) if isinstance(bad_value, int) else -5
                groups[g] = _set(t, col, values, typ)
            elif kind == "cast":
                new = pa.string() if data.draw(st.booleans()) else (pa.float64() if feature else pa.int32())
                groups = [
                    x.set_column(
                        x.schema.get_field_index(col),
                        col,
                        pa.array(
                            [str(v) if new == pa.string() else v for v in x.column(col).to_pylist()],
                            type=new
                            if feature is None or not feature.multi_hot or new == pa.string()
                            else pa.list_(pa.int32()),
                        ),
                    )
                    for x in groups
                ]
            elif kind == "drop":
                groups = [x.drop_columns([col]) for x in groups]
            elif kind == "extra":
                groups = [x.append_column("surprise", pa.array(np.zeros(x.num_rows, np.float32))) for x in groups]
            elif kind == "rename":
                groups = [x.rename_columns([c if c != col else col + "_x" for c in x.column_names]) for x in groups]
            elif kind == "no_groups":
                groups = []
            elif kind == "empty_group":
                groups.insert(g, t.slice(0, 0))
            elif kind == "list_nulls" and feature is not None and feature.multi_hot:
                values[r] = [1, None]
                groups[g] = _set(t, col, values, typ)
            return groups

        _rewrite(target, mutate)
        _expect_clear(root, target)
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


# ------------------------------------------------------------------------------------- metadata.json


@FUZZ
@given(data=st.data())
def test_broken_metadata_fails_with_one_clear_error(base, data):
    """metadata.json problems surface from ``DatasetMeta.load`` as ``ValueError`` (``DataError`` is one)
    naming the file, or as FileNotFoundError naming the missing file."""
    root = _copy(base)
    try:
        path = root / "metadata.json"
        meta = json.loads(path.read_text())
        kind = data.draw(st.sampled_from(["bytes", "json", "field"]))
        if kind == "bytes":
            path.write_bytes(data.draw(st.binary(max_size=200)))
        elif kind == "json":
            path.write_text(
                json.dumps(
                    data.draw(
                        st.recursive(
                            st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                            max_leaves=10,
                        )
                    )
                )
            )
        else:
            key = data.draw(st.sampled_from(["sparse", "dense", "splits", "rows", "label", "format_version"]))
            meta[key] = data.draw(
                st.sampled_from(
                    [
                        None,
                        -1,
                        "x",
                        [],
                        {},
                        [{"name": "C1", "cardinality": 0}],
                        {"train": ["../../etc/passwd"]},
                        {"train": 10**9},
                    ]
                )
            )
            path.write_text(json.dumps(meta))
        try:
            _read_all(root)
        except FileNotFoundError as e:
            assert str(root) in str(e)
        except ValueError as e:  # DataError, or DatasetMeta.load's "invalid data set metadata"
            assert "\n" not in str(e).strip() or "metadata" in str(e)
            assert str(root) in str(e)
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


# --------------------------------------------------------------------------------------- config loader


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda c: (
        st.lists(c, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "data",
                    "embedding",
                    "model",
                    "train",
                    "run",
                    "k",
                    "d",
                    "path",
                    "batch_size",
                    "tables",
                    "sharding",
                    "name",
                    "lr",
                    "x",
                    "C1",
                    "resume",
                    "keep_checkpoints",
                ]
            )
            | st.text(max_size=6),
            c,
            max_size=4,
        )
    ),
    max_leaves=20,
)


def _expect_config_error(path, overrides):
    try:
        load_config(path, overrides)
    except ConfigError as e:
        assert str(e).strip()
        assert len(str(e)) < 20_000


@FUZZ
@given(doc=yaml_values, overrides=st.lists(st.text(max_size=30), max_size=3))
def test_config_loader_structured_garbage(tmp_path, doc, overrides):
    path = tmp_path / "c.yaml"  # rewritten by every example
    path.write_text(yaml.safe_dump(doc))
    _expect_config_error(path, overrides)


@FUZZ
@given(
    raw=st.binary(max_size=400) | st.text(max_size=400).map(str.encode),
    overrides=st.lists(
        st.sampled_from(
            [
                "train.batch_size=",
                "a.b=[",
                "run=1",
                "run.dir.x=2",
                "=",
                "train",
                "embedding.k=&a [*a]",
                "x.y={a: [1, {b: 2}]}",
                "model.top_mlp=[-1]",
                "train.keep_checkpoints=0",
                "run.resume=maybe",
            ]
        ),
        max_size=3,
    ),
)
def test_config_loader_raw_bytes(tmp_path, raw, overrides):
    path = tmp_path / "c.yaml"  # rewritten by every example
    path.write_bytes(raw)
    _expect_config_error(path, overrides)


def test_config_loader_hostile_files(tmp_path):
    cases = {
        "non-utf8.yaml": b"\xff\xfe\x00 train: {}",
        "deep.yaml": b"[" * 50_000 + b"]" * 50_000,
        "tag.yaml": b"!!python/object/apply:os.system ['true']",
        "notmap.yaml": b"- 1\n- 2\n",
    }
    # the "billion laughs": aliases nesting 9-element lists 9 levels deep under a typed key
    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 9):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*{'a' if i == 1 else f'l{i - 1}'}"] * 9) + "]")
    lines.append("model: {bottom_mlp: *l8}")
    cases["bomb.yaml"] = "\n".join(lines).encode()
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ConfigError) as err:
            load_config(tmp_path / name)
        assert name in str(err.value) and len(str(err.value)) < 5000, (name, str(err.value)[:500])
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match=r"adir.* is a directory"):
        load_config(tmp_path / "adir")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["train.batch_size=" + "[" * 50_000])
