"""`mlet export`: TorchRec's INT8 inference model from a collapsed model, per-table files, the checks."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_collapse import fake_run

from data_pipes.reader import ParquetBatchReader
from mlet_torchrec.errors import UserError
from mlet_torchrec.io import OutputError
from mlet_torchrec.serving.artifact import load_collapsed
from mlet_torchrec.serving.collapse import collapse
from mlet_torchrec.serving.export import (
    INT8_MODEL,
    SERVING_MD,
    Int8QualityError,
    export,
    export_tables,
    load_collapsed_model,
    load_int8,
    read_safetensors,
)

EBC = "net.sparse_arch.embedding_bag_collection"


@pytest.fixture(scope="module")
def collapsed(synth_dataset, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    run = fake_run(root / "run", synth_dataset(), ["embedding.d=8", "embedding.k=16"], seed=4)
    collapse(run, root / "collapsed", check_split=None)
    return root / "collapsed"


def _tables(directory: Path) -> dict:
    state = load_collapsed(directory)[0].state_dict()
    prefix = f"{EBC}.embedding_bags."
    return {k[len(prefix) : -len(".weight")]: v for k, v in state.items() if k.startswith(prefix)}


def test_int8_model_and_table_files(collapsed, tmp_path):
    out = tmp_path / "export"
    report = export(collapsed, out, int8=True, formats=("npy", "safetensors"), auc_tolerance=1.0)
    assert report.int8_model == INT8_MODEL and (out / INT8_MODEL).is_file()
    assert report.check_split == "test" and report.rows_checked == 300
    assert report.auc_diff == pytest.approx(abs(report.int8_metrics["auc"] - report.fp32_metrics["auc"]))
    assert 0 < report.int8_table_bytes < report.fp32_table_bytes
    man = json.loads((out / "manifest.json").read_text())
    assert man["int8"]["builder"] == "torchrec.inference.modules.quantize_inference_model"
    assert (out / "SERVING.md").read_text() == SERVING_MD and (out / "config.yaml").is_file()
    assert json.loads((out / "export_report.json").read_text())["int8_model"] == INT8_MODEL

    # the INT8 model predicts what the FP32 model does, up to INT8 rounding of the tables
    fp32 = load_collapsed(collapsed)[0]
    int8 = load_int8(out / INT8_MODEL)
    config = yaml.safe_load((collapsed / "config.yaml").read_text())
    batch = next(iter(ParquetBatchReader(config["data"]["path"], "test", 64, shuffle=False)))
    with torch.no_grad():
        p32 = torch.sigmoid(fp32(batch.dense_features, batch.sparse_features))
        p8 = torch.sigmoid(int8(batch.dense_features, batch.sparse_features).squeeze(-1))
    assert p8.shape == p32.shape == (64,)
    assert 0 < float((p8 - p32).abs().max()) < 0.02

    tables = _tables(collapsed)
    st, meta = read_safetensors(out / "tables.safetensors")
    assert set(st) == set(tables) and json.loads(meta["tables"])["t_C1"]["d"] == 8
    for name, w in tables.items():
        assert np.array_equal(np.load(out / "tables" / f"{name}.npy"), w.numpy())
        assert np.array_equal(st[name], w.numpy())


def test_safetensors_file_reads_with_the_safetensors_library(collapsed, tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy")
    export_tables(collapsed, tmp_path, "safetensors")
    loaded = safetensors.load_file(str(tmp_path / "tables.safetensors"))
    for name, w in _tables(collapsed).items():
        assert np.array_equal(loaded[name], w.numpy())


def test_check_needs_the_data_unless_no_check(collapsed, tmp_path):
    moved = tmp_path / "collapsed"
    shutil.copytree(collapsed, moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["data"]["path"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="--no-check"):
        export(moved, tmp_path / "out", int8=True)
    assert not (tmp_path / "out").exists()

    # without the data set: the model comes from the manifest alone
    report = export(moved, tmp_path / "out", int8=True, check=False)
    assert report.check_split is None and (tmp_path / "out" / INT8_MODEL).is_file()
    model, man = load_collapsed_model(moved)
    assert man["d"] == 8 and sum(1 for _ in model.parameters()) > 0

    from mlet_torchrec.cli import main

    assert main(["export", "--collapsed", str(moved), "--output", str(tmp_path / "cli"), "--int8"]) == 2
    assert (
        main(
            [
                "export",
                "--collapsed",
                str(moved),
                "--output",
                str(tmp_path / "cli"),
                "--int8",
                "--no-check",
                "--format",
                "npy",
            ]
        )
        == 0
    )
    assert (tmp_path / "cli" / "tables" / "t_C4.npy").is_file()


def test_quality_failure_and_bad_requests(collapsed, tmp_path):
    with pytest.raises(Int8QualityError, match="tolerance"):
        export(collapsed, tmp_path / "out", int8=True, auc_tolerance=-1.0)
    assert not (tmp_path / "out").exists()  # a failed check writes nothing
    with pytest.raises(UserError, match="nothing to export"):
        export(collapsed, tmp_path / "out", int8=False)
    with pytest.raises(UserError, match="format"):
        export(collapsed, tmp_path / "out", int8=False, formats=("parquet",))
    with pytest.raises(UserError, match="mlet collapse"):
        export(tmp_path, tmp_path / "out")
    export(collapsed, tmp_path / "out", int8=False, formats=("npy",))
    with pytest.raises(OutputError, match="--overwrite"):
        export(collapsed, tmp_path / "out", int8=False, formats=("npy",))


def test_deepctr_model_with_first_order_tables(synth_dataset, tmp_path):
    """DeepFM has a second EBC (lin_* tables): collapse copies it, export quantizes and writes it too."""
    run = fake_run(
        tmp_path / "run",
        synth_dataset(),
        ["model.name=deepfm", "embedding.d=8", "embedding.k=16", "model.dnn_hidden_units=[16]"],
    )
    report = collapse(run, tmp_path / "collapsed", max_check_rows=256)
    assert report.max_abs_diff <= 1e-5
    man = json.loads((tmp_path / "collapsed" / "manifest.json").read_text())
    assert set(man["extra_tables"]) == {f"lin_C{i}" for i in range(1, 5)} and "architecture" not in man
    lin = man["extra_tables"]["lin_C2"]
    assert lin["key"] == "model.net.linear_arch.embedding_bag_collection.embedding_bags.lin_C2.weight"
    assert lin["rows"] == man["tables"]["t_C2"]["rows"] and lin["pooling"] == "sum"

    out = export(tmp_path / "collapsed", tmp_path / "export", int8=True, formats=("npy",), auc_tolerance=1.0)
    assert out.rows_checked == 300 and (tmp_path / "export" / "tables" / "lin_C2.npy").is_file()
    state = load_collapsed(tmp_path / "collapsed")[0].state_dict()
    assert np.array_equal(
        np.load(tmp_path / "export" / "tables" / "lin_C2.npy"),
        state["net.linear_arch.embedding_bag_collection.embedding_bags.lin_C2.weight"].numpy(),
    )
    assert out.max_abs_prob_diff < 0.02
