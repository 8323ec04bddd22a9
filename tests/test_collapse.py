"""Collapse in one process: the blocked kernel, layouts, the exchange engine and the command's output.

``fake_run`` writes a training-checkpoint lookalike (random W1/W2, DCP in this process) so these
tests need no training; tests/test_collapse_distributed.py runs the real thing on 2 and 4 ranks.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from data_pipes.schema import DatasetMeta
from mlet_torchrec.config import load_config
from mlet_torchrec.errors import UserError
from mlet_torchrec.io import OutputError
from mlet_torchrec.models.registry import build_model
from mlet_torchrec.modules.product import mlet_product
from mlet_torchrec.serving.artifact import MANIFEST, load_collapsed, load_factored
from mlet_torchrec.serving.collapse import collapse, collapse_state_dict
from mlet_torchrec.serving.layout import Box, assign_boxes, mirror_layout, source_chunks
from mlet_torchrec.serving.manifest import manifest
from mlet_torchrec.serving.sharded_product import collapse_boxes
from mlet_torchrec.training.checkpoint import CHECKPOINT_META, LATEST

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fake_run(run_dir: Path, data: Path, overrides: Sequence[str] = (), seed: int = 0) -> Path:
    """A run directory with one checkpoint of a randomly initialised factored model (tiny config)."""
    cfg = load_config(CONFIGS / "tiny.yaml", [f"data.path={data}", f"run.dir={run_dir}", *overrides])
    meta = DatasetMeta.load(data)
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.embedding, meta)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".w1." in name:
                p.normal_(0.0, 0.3)  # large enough that the tables move the predictions
    ckpt = run_dir / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt), no_dist=True)
    cfg.save(ckpt / "config.yaml")
    cfg.save(run_dir / "config.yaml")
    (ckpt / CHECKPOINT_META).write_text(json.dumps({"step": 1, "world_size": 1}))
    (run_dir / "checkpoints" / LATEST).write_text(ckpt.name + "\n")
    return run_dir


# ---------------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("block_rows", [1, 7, 64, 10_000])
@pytest.mark.parametrize("accumulate", [torch.float32, torch.float64])
def test_blocked_product_equals_matmul(block_rows, accumulate):
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(333, 24, generator=g), torch.randn(24, 8, generator=g)
    exact = (w1.double() @ w2.double()).float()
    got = mlet_product(w1, w2, block_rows=block_rows, accumulate=accumulate)
    assert got.dtype == torch.float32 and got.shape == (333, 8)
    torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-5)
    if accumulate == torch.float64:  # rounded once: the correctly rounded product
        assert torch.equal(got, exact)
    assert mlet_product(w1[:0], w2, block_rows=block_rows).shape == (0, 8)
    with pytest.raises(ValueError, match="block_rows"):
        mlet_product(w1, w2, block_rows=-1)


def test_product_is_differentiable_and_batched():
    """The training forward's regime: (F, B, k) @ (F, k, d) with gradients, equal to per-feature products."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    w2 = torch.randn(3, 8, 4, generator=g, requires_grad=True)
    y = mlet_product(x, w2)
    y.sum().backward()
    assert x.grad is not None and w2.grad is not None
    for f in range(3):
        torch.testing.assert_close(y[f], mlet_product(x[f].detach(), w2[f].detach(), block_rows=2))


# ---------------------------------------------------------------------------------- layouts


def _tiles(boxes, rows, cols):
    grid = torch.zeros(rows, cols, dtype=torch.int64)
    for b in boxes:
        grid[b.row : b.row_end, b.col : b.col_end] += 1
    return bool((grid == 1).all())


def test_mirror_layout_keeps_rows_and_splits_columns():
    row_wise = [Box(0, 0, 6, 16, 0), Box(6, 0, 4, 16, 1)]
    assert mirror_layout(row_wise, 10, 4) == [Box(0, 0, 6, 4, 0), Box(6, 0, 4, 4, 1)]
    column_wise = [Box(0, 0, 10, 8, 1), Box(0, 8, 10, 8, 0)]
    assert mirror_layout(column_wise, 10, 4) == [Box(0, 0, 10, 2, 1), Box(0, 2, 10, 2, 0)]
    table_wise = [Box(0, 0, 10, 16, 3)]
    assert mirror_layout(table_wise, 10, 4) == [Box(0, 0, 10, 4, 3)]
    # more column shards than output columns: the first d owners keep one column each
    many = [Box(0, c, 5, 1, c) for c in range(6)]
    out = mirror_layout(many, 5, 4)
    assert [b.rank for b in out] == [0, 1, 2, 3] and _tiles(out, 5, 4)
    # rows split differently in different column ranges
    mixed = [Box(0, 0, 5, 8, 0), Box(5, 0, 5, 8, 1), Box(0, 8, 10, 8, 2)]
    out = mirror_layout(mixed, 10, 4)
    assert _tiles(out, 10, 4) and {b.rank for b in out} == {0, 1, 2}


def test_assign_boxes_keeps_writers_or_rebalances():
    chunks = {
        "a": [(Box(0, 0, 100, 16, -1), 0), (Box(100, 0, 50, 16, -1), 1)],
        "b": [(Box(0, 0, 30, 8, -1), 1), (Box(0, 8, 30, 8, -1), 0)],
    }
    same = assign_boxes(chunks, 2, keep_writers=True)
    assert [b.rank for b in same["a"]] == [0, 1] and {(b.col, b.rank) for b in same["b"]} == {(0, 1), (8, 0)}
    for world in (1, 3, 4, 7):
        got = assign_boxes(chunks, world, keep_writers=False)
        assert _tiles(got["a"], 150, 16) and _tiles(got["b"], 30, 16)
        load = [0] * world
        for boxes in got.values():
            for b in boxes:
                assert 0 <= b.rank < world
                load[b.rank] += b.rows * b.cols
        assert max(load) <= 2 * (sum(load) / world) + 16 * 30  # balanced up to one piece
    # a writer rank that does not exist at this world size: rebalanced
    moved = assign_boxes(chunks, 1, keep_writers=True)
    assert {b.rank for bs in moved.values() for b in bs} == {0}


@pytest.mark.parametrize("single_layer", [False, True])
def test_collapse_boxes_sums_column_partials(single_layer):
    """One process holding every box: partial products over column shards and misaligned rows add up."""
    g = torch.Generator().manual_seed(1)
    n, k, d = 37, 12, 4
    if single_layer:
        k = d
    w1 = torch.randn(n, k, generator=g)
    w2 = None if single_layer else torch.randn(k, d, generator=g)
    in_boxes = [Box(0, 0, 20, k // 2, 0), Box(0, k // 2, 20, k - k // 2, 0), Box(20, 0, 17, k, 0)]
    out_boxes = [Box(0, 0, 11, d, 0), Box(11, 0, 26, 1, 0), Box(11, 1, 26, d - 1, 0)]
    local = {b: w1[b.row : b.row_end, b.col : b.col_end].clone() for b in in_boxes}
    out = collapse_boxes(local, in_boxes, out_boxes, w2, rank=0, block_rows=5, accumulate=torch.float64)
    expected = w1 if single_layer else (w1.double() @ w2.double()).float()
    full = torch.empty(n, d)
    for b, v in out.items():
        full[b.row : b.row_end, b.col : b.col_end] = v
    torch.testing.assert_close(full, expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------- the command


def test_collapse_one_process(synth_dataset, tmp_path):
    data = synth_dataset()
    # C1 single-layer (k = d), the others MLET with k = 16
    run = fake_run(tmp_path / "run", data, ["embedding.k=null", *[f"embedding.tables.C{i}.k=16" for i in (2, 3, 4)]])
    report = collapse(run, tmp_path / "out", max_check_rows=200)
    assert report.max_abs_diff <= 1e-5 and report.rows_checked == 200 and report.world_size == 1
    assert report.collapsed_metrics["rows"] == 200

    plain, config, meta = load_collapsed(tmp_path / "out")
    factored, *_ = load_factored(run)
    reference = collapse_state_dict(factored, build_model(config.model, config.embedding, meta, collapsed=True))
    got = plain.state_dict()
    assert set(got) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    assert torch.equal(
        got["net.sparse_arch.embedding_bag_collection.embedding_bags.t_C1.weight"],
        factored.state_dict()["net.sparse_arch.embedding_bag_collection.w1.embedding_bags.t_C1.weight"],
    )

    man = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert man["format"].startswith("mlet-torchrec collapsed model")
    assert man["tables"]["t_C1"]["k"] is None and man["tables"]["t_C2"]["k"] == 16 and man["k"] == 16
    assert man["sigma"] == config.embedding.sigma
    for name, t in man["tables"].items():
        assert set(t) >= {"rows", "d", "features", "pooling", "k", "sigma", "key"}
        assert t["rows"] == meta.cardinalities()[t["features"][0]] and t["d"] == 4
        assert t["key"] == f"model.net.sparse_arch.embedding_bag_collection.embedding_bags.{name}.weight"
    src = man["source_checkpoint"]
    assert src["step"] == 1 and len(src["dcp_metadata_sha256"]) == 64 and src["path"].endswith("step_00000001")
    assert len(man["dcp_metadata_sha256"]) == 64
    assert man["architecture"] == {
        "dense_in_features": 3,
        "dense_arch_layer_sizes": [16, 4],
        "over_arch_layer_sizes": [16, 1],
    }
    assert (tmp_path / "out" / "plan.json").is_file() and (tmp_path / "out" / "collapse_report.json").is_file()

    # DCP keys are what a stock model expects
    keys = set(dcp.FileSystemReader(str(tmp_path / "out")).read_metadata().state_dict_metadata)
    assert {t["key"] for t in man["tables"].values()} <= keys
    assert not any(".w1." in k or ".w2." in k for k in keys)

    with pytest.raises(OutputError, match="--overwrite"):
        collapse(run, tmp_path / "out")
    again = collapse(run, tmp_path / "out", check_split=None, overwrite=True, accumulate="float64", block_rows=7)
    assert again.rows_checked == 0 and again.accumulate == "float64"
    with pytest.raises(UserError, match="check split"):
        collapse(run, tmp_path / "other", check_split="nope")
    with pytest.raises(UserError, match="output sharding"):
        collapse(run, tmp_path / "other", output_sharding="diagonal")


def test_collapse_detects_a_wrong_product(synth_dataset, tmp_path, monkeypatch):
    import mlet_torchrec.serving.collapse as mod

    run = fake_run(tmp_path / "run", synth_dataset())
    real = mod.collapse_boxes

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        for v in out.values():
            v.mul_(1.5)
        return out

    monkeypatch.setattr(mod, "collapse_boxes", broken)
    with pytest.raises(mod.CollapseMismatch, match="differ"):
        collapse(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-checked is left behind


def test_source_chunks_name_the_writer(synth_dataset, tmp_path):
    run = fake_run(tmp_path / "run", synth_dataset())
    ckpt = run / "checkpoints" / "step_00000001"
    key = "model.net.sparse_arch.embedding_bag_collection.w1.embedding_bags.t_C4.weight"
    (chunk,) = source_chunks(ckpt, [key])[key]
    box, writer = chunk
    assert writer == 0 and (box.row, box.col, box.cols) == (0, 0, 16)
    with pytest.raises(KeyError):
        source_chunks(ckpt, ["model.nope"])


def test_manifest_without_checkpoint_metadata(synth_dataset, tmp_path):
    data = synth_dataset()
    cfg = load_config(CONFIGS / "tiny.yaml", [f"data.path={data}"])
    man = manifest(cfg, DatasetMeta.load(data), tmp_path, 7)
    assert man["source_checkpoint"] == {"path": str(tmp_path.resolve()), "step": 7}
