"""`mlet export`: TorchRec's INT8 inference model from a collapsed model, per-table files, the checks."""

import json
import os
import re
import shutil
import subprocess
import sys
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
    Int8QualityError,
    export,
    export_tables,
    load_collapsed_model,
    read_safetensors,
)
from mlet_torchrec.serving.torchrec_package import (
    PREDICT_FP32,
    PREDICT_INT8,
    batch_from_kjt,
    read_extra_files,
    sharded_file,
)

INT8_MODEL = PREDICT_INT8
# a process that imports only torch and torchrec: loads each dict-signature module and scores the batch
ONLY_TORCHREC = """
import sys, torch, torchrec
batch = torch.load(sys.argv[1])
out = {}
for name in sys.argv[3:]:
    model = torch.jit.load(name)
    out[name] = model(batch)["default"]
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("mlet_torchrec", "data_pipes"))
torch.save({"probs": out, "ours": ours}, sys.argv[2])
"""

EBC = "net.sparse_arch.embedding_bag_collection"


@pytest.fixture(scope="module")
def collapsed(synth_dataset, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    run = fake_run(root / "run", synth_dataset(), ["embedding.d=8", "embedding.k=16"], seed=4)
    collapse(run, root / "collapsed", check_split=None)
    return root / "collapsed"


def run_snippets(markdown: str, export_dir: Path, collapsed_dir: Path) -> list[dict]:
    """Run every python block of a SERVING.md as written (paths filled in), each in its own scope after the
    blocks before it; the scopes."""
    scope: dict = {}
    scopes = []
    for code in re.findall(r"```python\n(.*?)```", markdown, flags=re.S):
        code = code.replace('"path/to/export"', repr(str(export_dir))).replace(
            '"path/to/collapsed"', repr(str(collapsed_dir))
        )
        exec(code, scope)
        scopes.append(dict(scope))
    return scopes


def _tables(directory: Path) -> dict:
    state = load_collapsed(directory)[0].state_dict()
    prefix = f"{EBC}.embedding_bags."
    return {k[len(prefix) : -len(".weight")]: v for k, v in state.items() if k.startswith(prefix)}


def test_int8_model_and_table_files(collapsed, tmp_path):
    out = tmp_path / "export"
    report = export(collapsed, out, int8=True, formats=("npy", "safetensors"), auc_tolerance=1.0, shards=2)
    assert report.int8_model == INT8_MODEL and report.fp32_model == PREDICT_FP32
    assert report.sharded_model == sharded_file(2) and report.sharded_max_abs_prob_diff <= 1e-6
    assert report.check_split == "test" and report.rows_checked == 300
    assert report.auc_diff == pytest.approx(abs(report.int8_metrics["auc"] - report.fp32_metrics["auc"]))
    assert 0 < report.int8_table_bytes < report.fp32_table_bytes
    man = json.loads((out / "manifest.json").read_text())
    modules = man["predict_modules"]
    assert modules["int8"]["builder"] == "torchrec.inference.modules.quantize_inference_model"
    assert (
        modules["int8_shards2"]["sharding"]["shards"] == 2
        and "table_wise" in modules["int8_shards2"]["sharding"]["plan"]
    )
    assert modules["fp32"]["id_list_features_keys"] == man["sparse_features"]
    assert (out / "config.yaml").is_file()
    assert json.loads((out / "export_report.json").read_text())["int8_model"] == INT8_MODEL
    # the metadata TorchRec's PredictFactory declares, inside the scripted file
    assert read_extra_files(out / PREDICT_INT8) == {
        "batching_metadata": {
            "float_features": {"type": "dense", "device": "cpu", "pinned": []},
            "id_list_features": {"type": "sparse", "device": "cpu", "pinned": []},
        },
        "result_metadata": "dict_of_tensor",
    }

    # a process importing only torch and torchrec calls every module with TorchRec's dict signature
    fp32 = load_collapsed(collapsed)[0]
    config = yaml.safe_load((collapsed / "config.yaml").read_text())
    batch = next(iter(ParquetBatchReader(config["data"]["path"], "test", 64, shuffle=False)))
    dict_batch = batch_from_kjt(batch.dense_features, batch.sparse_features)
    torch.save({k: v.clone() for k, v in dict_batch.items()}, tmp_path / "batch.pt")
    files = [str(out / f) for f in (PREDICT_FP32, PREDICT_INT8, sharded_file(2))]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-c", ONLY_TORCHREC, str(tmp_path / "batch.pt"), str(tmp_path / "out.pt"), *files]
    subprocess.run(cmd, check=True, cwd=tmp_path, env=env)
    got = torch.load(tmp_path / "out.pt")
    assert got["ours"] == []
    p_fp32, p_int8, p_sharded = (got["probs"][f] for f in files)
    with torch.no_grad():
        p32 = torch.sigmoid(fp32(batch.dense_features, batch.sparse_features))
    assert p_int8.shape == p32.shape == (64,)
    assert float((p_fp32 - p32).abs().max()) <= 1e-6  # the FP32 module is the collapsed model
    assert 0 < float((p_int8 - p32).abs().max()) < 0.02  # INT8 rounding of the tables
    assert float((p_sharded - p_int8).abs().max()) <= 1e-6  # sharding moves tables, not numbers

    # SERVING.md, written for DLRM: its three blocks as written; stock TorchRec's DLRM is the FP32 model
    doc = (out / "SERVING.md").read_text()
    assert doc.startswith("# Serving an `mlet export` of a `dlrm` model") and "predict_int8_shards2.pt" in doc
    scopes = run_snippets(doc, out, collapsed)
    assert len(scopes) == 3 and scopes[0]["probs"].shape == (2,)
    assert list(scopes[1]["ebcs"]) == ["model.net.sparse_arch.embedding_bag_collection."]
    with torch.no_grad():
        stock = torch.sigmoid(scopes[2]["dlrm"](batch.dense_features, batch.sparse_features)).squeeze(-1)
    assert float((stock - p_fp32).abs().max()) <= 1e-6

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

    from mlet_torchrec.cli.main import main

    assert main(["export", "--input", str(moved), "--output", str(tmp_path / "cli"), "--int8"]) == 2
    assert (
        main(
            [
                "export",
                "--input",
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
    with pytest.raises(UserError, match="--int8"):
        export(collapsed, tmp_path / "out", int8=False, shards=2)
    with pytest.raises(UserError, match="--shards 1000: the model has [0-9]+ tables"):
        export(collapsed, tmp_path / "out", int8=True, shards=1000)
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

    out = export(tmp_path / "collapsed", tmp_path / "export", int8=True, formats=("npy",), auc_tolerance=1.0, shards=2)
    assert out.rows_checked == 300 and (tmp_path / "export" / "tables" / "lin_C2.npy").is_file()
    state = load_collapsed(tmp_path / "collapsed")[0].state_dict()
    assert np.array_equal(
        np.load(tmp_path / "export" / "tables" / "lin_C2.npy"),
        state["net.linear_arch.embedding_bag_collection.embedding_bags.lin_C2.weight"].numpy(),
    )
    assert out.max_abs_prob_diff < 0.02 and out.sharded_max_abs_prob_diff <= 1e-6  # both EBCs sharded

    # SERVING.md, written for DeepFM: no DLRM, the lin_* tables named; its blocks as written
    doc = (tmp_path / "export" / "SERVING.md").read_text()
    assert "`deepfm` model" in doc and "DLRM(" not in doc and "lin_*" in doc and "DeepFMModel" in doc
    scopes = run_snippets(doc, tmp_path / "export", tmp_path / "collapsed")
    assert len(scopes) == 2 and scopes[0]["probs"].shape == (2,)
    ebcs = scopes[1]["ebcs"]
    assert sorted(ebcs) == [
        "model.net.linear_arch.embedding_bag_collection.",
        "model.net.sparse_arch.embedding_bag_collection.",
    ]
    for prefix, ebc in ebcs.items():
        for key, value in ebc.state_dict().items():
            assert torch.equal(value, state[prefix[len("model.") :] + key])


def test_readme_export_commands_are_what_the_cli_accepts():
    from mlet_torchrec.cli.main import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = re.findall(r"^mlet (export .*?)(?:\s+#.*)?$", readme, flags=re.M)
    assert commands
    for command in commands:
        args = build_parser().parse_args(command.split())
        assert args.input and args.output
    assert build_parser().parse_args(
        ["export", "--input", "c", "--output", "o", "--format", "safetensors", "npy"]
    ).format == [
        "safetensors",
        "npy",
    ]
