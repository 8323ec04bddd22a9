"""`mlet predict` and `mlet evaluate` on runs, collapse outputs and exports, on the model's own data or new data
converted with --features-from: probabilities in the split's row order, equal to the model's own forward."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from test_collapse import fake_run
from test_transform import _criteo_raw
from torchrec import KeyedJaggedTensor

from data_pipes.convert import convert_criteo
from data_pipes.schema import DatasetMeta
from data_pipes.transform import FeatureTransform
from mlet_torchrec.errors import UserError
from mlet_torchrec.io import OutputError
from mlet_torchrec.serving.artifact import load_artifact
from mlet_torchrec.serving.collapse import collapse
from mlet_torchrec.serving.export import export
from mlet_torchrec.serving.predict import predict
from mlet_torchrec.serving.scoring import evaluate_path
from mlet_torchrec.serving.torchrec_package import PREDICT_FP32, PREDICT_INT8
from mlet_torchrec.training.launcher import run_local

MODELS = {"dlrm": [], "deepfm": ["model.name=deepfm"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A converted raw data set, "tomorrow's" raw rows converted --features-from it, and per model a run (a
    small eval batch, so the reader's stream interleaves the split's rows), its collapse and its export."""
    root = tmp_path_factory.mktemp("predict")
    _criteo_raw(root / "day0.tsv", 900, random.Random(0))
    convert_criteo(root / "day0.tsv", root / "data", min_count=1, progress=False)
    _criteo_raw(root / "day1.tsv", 250, random.Random(1))
    convert_criteo(root / "day1.tsv", root / "day1", features_from=root / "data", progress=False)
    out = {"data": root / "data", "day1": root / "day1", "root": root}
    for name, overrides in MODELS.items():
        over = ["embedding.d=8", "embedding.k=16", "train.eval_batch_size=40", *overrides]
        run = fake_run(root / f"run_{name}", root / "data", over, seed=3)
        collapse(run, root / f"collapsed_{name}", check_split=None)
        export(root / f"collapsed_{name}", root / f"export_{name}", int8=True, check=False)
        out |= {
            f"run_{name}": run,
            f"collapsed_{name}": root / f"collapsed_{name}",
            f"export_{name}": root / f"export_{name}",
        }
    return out


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    t = pq.read_table(path)
    return t.column("probability").to_numpy(), t.column("label").to_numpy()


def _direct(run: Path, data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The factored model's own forward on the split's rows read straight from Parquet, in file order."""
    model = load_artifact(run).materialize()
    meta = DatasetMeta.load(data)
    t = pa.concat_tables([pq.read_table(p) for p in meta.files(data, split)])
    names = meta.sparse_names()
    dense = torch.from_numpy(np.stack([t.column(n).to_numpy() for n in meta.dense], 1))
    values = torch.from_numpy(np.concatenate([t.column(n).to_numpy() for n in names]))
    kjt = KeyedJaggedTensor.from_lengths_sync(names, values, torch.ones(len(values), dtype=torch.int64))
    with torch.no_grad():
        logits = model.net(dense, kjt).reshape(-1)
    return torch.sigmoid(logits.double()).numpy(), t.column("label").to_numpy()


def _auc(p: np.ndarray, labels: np.ndarray) -> float:
    ranks = np.argsort(np.argsort(p)) + 1.0
    pos = labels == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


@pytest.mark.parametrize("name", list(MODELS))
def test_run_collapse_and_exports_predict_the_models_own_probabilities(world, name, tmp_path):
    """On "tomorrow's" data (converted --features-from the training data set): run, collapse and FP32
    export within 1e-6 of the factored model's own forward; INT8 within the export's AUC tolerance."""
    expected, labels = _direct(world[f"run_{name}"], world["day1"], "test")
    assert expected.std() > 1e-3  # the rows get different scores: their order is checked
    got = {}
    for kind, precision in (("run", None), ("collapsed", None), ("export", "fp32"), ("export", "int8")):
        out = tmp_path / f"{kind}-{precision}.parquet"
        report = predict(world[f"{kind}_{name}"], world["day1"], "test", out, precision)
        assert report.rows == len(expected) == 250 and report.precision == (precision or "fp32")
        got[(kind, precision)], got_labels = _read(out)
        assert np.array_equal(got_labels, labels)
    for key in (("run", None), ("collapsed", None), ("export", "fp32")):
        np.testing.assert_allclose(got[key], expected, rtol=0, atol=1e-6, err_msg=str(key))
    int8 = got[("export", "int8")]
    assert not np.array_equal(int8, got[("export", "fp32")])  # it is the INT8 model
    assert abs(_auc(int8, labels) - _auc(expected, labels)) <= 1e-3  # export's auc_tolerance
    # evaluate scores the FP32 export on the other data set like predict does
    metrics = evaluate_path(world[f"export_{name}"], "test", "exact", data=world["day1"], precision="fp32")
    assert metrics["rows"] == 250 and metrics["auc"] == pytest.approx(_auc(expected, labels), abs=1e-6)


@pytest.mark.slow
def test_two_ranks_write_the_one_process_file(world, tmp_path):
    """Both models, each kind of input: the run (tables sharded over the ranks by TorchRec), its collapse output
    and its export's INT8 model (whole in every rank)."""
    kinds = tuple(f"{kind}_{name}" for name in MODELS for kind in ("run", "collapsed", "export"))
    for kind in kinds:
        one = predict(world[kind], world["day1"], "test", tmp_path / f"{kind}-1.parquet")
        two = run_local(2, partial(predict, world[kind], world["day1"], "test", tmp_path / f"{kind}-2.parquet"))
        assert one.rows == two.rows == 250 and two.world_size == 2
        p1, l1 = _read(Path(one.output))
        p2, l2 = _read(Path(two.output))
        np.testing.assert_allclose(p2, p1, rtol=0, atol=1e-6)
        assert np.array_equal(l1, l2)
    # the CSV format is chosen where rank 0 assembles the ranks' parts: 2 ranks write the 1-process CSV
    csv = {n: tmp_path / f"export_dlrm-{n}.csv" for n in (1, 2)}
    predict(world["export_dlrm"], world["day1"], "test", csv[1])
    run_local(2, partial(predict, world["export_dlrm"], world["day1"], "test", csv[2]))
    one, two = (pacsv.read_csv(csv[n]) for n in (1, 2))
    assert csv[2].read_bytes().startswith(b'"probability","label"\n') and one.num_rows == two.num_rows == 250
    np.testing.assert_allclose(two.column("probability").to_numpy(), one.column("probability").to_numpy(), atol=1e-6)
    assert one.column("label").equals(two.column("label"))
    want = sorted([*(f"{k}-{n}.parquet" for k in kinds for n in (1, 2)), *(p.name for p in csv.values())])
    assert sorted(p.name for p in tmp_path.iterdir()) == want


def test_refusals_are_one_line_and_leave_nothing(world, tmp_path):
    run, export_dir = world["run_dlrm"], world["export_dlrm"]
    assert (export_dir / PREDICT_INT8).is_file() and (export_dir / PREDICT_FP32).is_file()
    man = json.loads((export_dir / "manifest.json").read_text())
    assert (
        man["transform_identity"]
        == json.loads((world["data"] / "metadata.json").read_text())["source"]["transform"]["identity"]
        == FeatureTransform.load(export_dir).identity  # the export carries its own copy
        == FeatureTransform.load(world["collapsed_dlrm"]).identity
    )
    # data converted on its own: another transform, other ids
    convert_criteo(world["root"] / "day1.tsv", tmp_path / "fresh", min_count=1, progress=False)
    with pytest.raises(UserError, match="its feature transform .* is not the one .* convert the raw data with"):
        predict(export_dir, tmp_path / "fresh", "test", tmp_path / "x.parquet")
    with pytest.raises(UserError, match="--precision int8 needs an export dir"):
        predict(run, None, "test", tmp_path / "x.parquet", "int8")
    with pytest.raises(UserError, match="has no split 'valid'"):
        predict(run, world["day1"], "valid", tmp_path / "x.parquet")
    foreign = tmp_path / "mine.parquet"
    foreign.write_bytes(b"not mlet's")
    with pytest.raises(OutputError, match="mlet did not write it"):
        predict(run, None, "test", foreign, overwrite=True)
    assert foreign.read_bytes() == b"not mlet's"
    ours = tmp_path / "ours.parquet"
    predict(run, None, "test", ours)
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        predict(run, None, "test", ours)
    predict(export_dir, None, "test", ours, overwrite=True)
    # a failure half way (a damaged row group of the split) leaves the old file and no temporary behind
    before = ours.read_bytes()
    shutil.copytree(world["day1"], tmp_path / "damaged")
    part = next((tmp_path / "damaged" / "test").glob("*.parquet"))
    raw = bytearray(part.read_bytes())
    raw[200:260] = b"\xff" * 60
    part.write_bytes(bytes(raw))
    with pytest.raises(UserError):
        predict(run, tmp_path / "damaged", "test", ours, overwrite=True)
    assert ours.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "fresh", "mine.parquet", "ours.parquet"]


def test_cli_predict_and_evaluate_on_an_export(world, tmp_path, capsys):
    from mlet_torchrec.cli.main import main

    out = tmp_path / "p.parquet"
    export_dir, day1 = str(world["export_dlrm"]), str(world["day1"])
    assert main(["predict", "--input", export_dir, "--data", day1, "--output", str(out)]) == 0
    assert capsys.readouterr().out.startswith("predict: 250 rows of")
    assert main(["evaluate", "--input", export_dir, "--data", day1, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 250
    assert main(["evaluate", "--input", export_dir, "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mlet evaluate: error: --data {tmp_path}: no metadata.json; is it a converted data set?"


def test_predict_writes_the_format_its_output_names(world, tmp_path, capsys):
    """--output x.csv wrote Parquet into x.csv: now CSV with the Parquet file's columns and values (float32 exact),
    replaced with --overwrite only when predict wrote it; a suffix it does not write is one line, exit 2 (a name
    without a suffix is Parquet, as before)."""
    from mlet_torchrec.cli.main import main

    export_dir, day1 = str(world["export_dlrm"]), str(world["day1"])
    parquet, csv = tmp_path / "p.parquet", tmp_path / "p.CSV"
    for out in (parquet, csv):
        assert main(["predict", "--input", export_dir, "--data", day1, "--output", str(out)]) == 0
    assert csv.read_bytes().startswith(b'"probability","label"\n')
    got = pacsv.read_csv(csv, convert_options=pacsv.ConvertOptions(column_types=pq.read_schema(parquet)))
    assert got.num_rows == 250 and got.equals(pq.read_table(parquet).replace_schema_metadata(None))
    before = csv.read_bytes()
    assert main(["predict", "--input", export_dir, "--data", day1, "--output", str(csv), "--overwrite"]) == 0
    assert csv.read_bytes() == before
    (tmp_path / "mine.csv").write_text("probability,label\n0.5,1\n")  # the user's own CSV
    for out, why in (("mine.csv", "mlet did not write it"), ("p.json", "not a format predict writes")):
        argv = ["predict", "--input", export_dir, "--data", day1, "--output", str(tmp_path / out), "--overwrite"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err, err
    err = err.strip()
    formats = "name a .parquet (Parquet) or .csv (CSV) file"
    assert err == f"mlet predict: error: --output {tmp_path / 'p.json'}: not a format predict writes; {formats}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.csv", "p.CSV", "p.parquet"]
    assert (tmp_path / "mine.csv").read_text() == "probability,label\n0.5,1\n"


FULL_DISK_SCRIPT = """
import json, sys
from pathlib import Path
from mlet_torchrec.errors import UserError
from mlet_torchrec.serving.collapse import collapse
from mlet_torchrec.serving.export import export
from mlet_torchrec.serving import predict as predict_module
from mlet_torchrec.serving.predict import predict


def unexplained(*args):  # a write failing without an errno, as torch.save's "unexpected pos" does
    raise RuntimeError("unexpected pos 4096 vs 0")


def predict_unexplained(out):
    predict_module._score_part, score_part = unexplained, predict_module._score_part
    try:
        predict(world["export_dlrm"], None, "test", out)
    finally:
        predict_module._score_part = score_part


world, mount, sizes = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
writers = {
    "predict": lambda out: predict(world["export_dlrm"], None, "test", out),
    "predict-unexplained": predict_unexplained,
    "collapse": lambda out: collapse(world["run_dlrm"], out, check_split=None),
    "export": lambda out: export(world["collapsed_dlrm"], out, int8=True, formats=["safetensors", "npy"], check=False),
}
for name, write in writers.items():
    size = json.loads(sizes.read_text())[name]
    for fraction in (0.1, 0.6):
        filler = mount / "filler"
        filler.unlink(missing_ok=True)
        free = int(size * fraction) // 4096 * 4096
        with open(filler, "wb") as f:
            f.write(bytes(MOUNT_BYTES - free))
        try:
            write(mount / f"{name}-out")
            print(json.dumps([name, fraction, "written"]), flush=True)
        except UserError as e:
            print(json.dumps([name, fraction, str(e)]), flush=True)
        print(json.dumps([name, "left", sorted(p.name for p in mount.iterdir())]), flush=True)
"""
MOUNT_BYTES = 4 << 20


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_full_disk_is_one_line_and_leaves_nothing(world, tmp_path):
    """predict, collapse and export onto a real full tmpfs, at 10% and 60% of the room each output needs: one line
    (before: pyarrow's and DCP's tracebacks, a C++ abort in torch.jit.save, a SIGBUS in a memory-mapped column),
    and nothing but the filler left. A predict whose write fails without an errno gets the full-disk note naming
    the output's own directory (it named that directory's parent). In a child process, so that a crash fails this
    test, not the session."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={MOUNT_BYTES}", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        predict(world["export_dlrm"], None, "test", tmp_path / "p.parquet")
        collapse(world["run_dlrm"], tmp_path / "c", check_split=None)
        export(world["collapsed_dlrm"], tmp_path / "e", int8=True, formats=["safetensors", "npy"], check=False)
        sizes = {
            "predict": _size(tmp_path / "p.parquet"),
            "predict-unexplained": _size(tmp_path / "p.parquet"),
            "collapse": _size(tmp_path / "c"),
            "export": _size(tmp_path / "e"),
        }
        (tmp_path / "sizes.json").write_text(json.dumps(sizes))
        script = f"MOUNT_BYTES = {MOUNT_BYTES}\n{FULL_DISK_SCRIPT}"
        args = [json.dumps({k: str(v) for k, v in world.items()}), str(mount), str(tmp_path / "sizes.json")]
        proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        assert len(lines) == 16, lines
        for name, what, result in lines:
            if what == "left":
                assert result == ["filler"], (name, result)
            else:  # the note, when there is one, names the directory that is full: the output's own
                assert result == f"no space left on the device while writing {mount}/{name}-out" or result.startswith(
                    f"no space left on the device while writing {mount}/{name}-out (the file system holding {mount} "
                    "is full: "
                ), (name, what, result)
        assert all("is full" in r for n, w, r in lines if n == "predict-unexplained" and w != "left"), lines
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_export_takes_only_a_collapse_output(world, tmp_path):
    """An export or a data set as the input of export: one line naming what it is (an export gave DCP's
    "metadata is None; global metadata read failed ..." as a damaged checkpoint)."""
    for source, made_by in [(world["export_dlrm"], "mlet export"), (world["data"], "mlet convert criteo")]:
        with pytest.raises(
            UserError, match=rf"an output of `{made_by}`; mlet export takes the output of `mlet collapse`"
        ):
            export(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_output_inside_a_finished_output(world, tmp_path):
    """predict into a data set's split folder wrote a Parquet file among its parts; export into a collapse
    output and collapse into a checkpoint wrote there too. A run directory still takes its collapse output."""
    shutil.copytree(world["data"], tmp_path / "data")
    before = sorted(str(p) for p in (tmp_path / "data").rglob("*"))
    with pytest.raises(OutputError, match=r"it is inside .*/data, an output of `mlet convert criteo`"):
        predict(world["export_dlrm"], tmp_path / "data", "test", tmp_path / "data" / "test" / "p.parquet")
    with pytest.raises(OutputError, match=r"it is inside .*collapsed_dlrm, an output of `mlet collapse`"):
        export(world["collapsed_dlrm"], world["collapsed_dlrm"] / "export", int8=False, check=False)
    assert sorted(str(p) for p in (tmp_path / "data").rglob("*")) == before
    assert not (world["collapsed_dlrm"] / "export").exists()
