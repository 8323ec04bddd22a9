"""`mlet plan`: TorchRec's planner on a described cluster, plan files, and `train --plan` (real gloo ranks)."""

import json
from pathlib import Path

import pytest

from data_pipes.schema import DatasetMeta
from mlet_torchrec.cli.main import main
from mlet_torchrec.config import load_config
from mlet_torchrec.errors import UserError
from mlet_torchrec.io import OutputError
from mlet_torchrec.training.planning import Cluster, PlanError, load_plan, make_plan, rank_ids, write_plan

ROOT = Path(__file__).resolve().parents[1]
CRITEO_1TB = ROOT / "configs" / "shapes" / "criteo_1tb"
TINY = ROOT / "configs" / "tiny.yaml"


def _plan_1tb(tmp_path: Path, *extra: str) -> int:
    return main(
        ["plan", "--config", str(ROOT / "configs" / "criteo_1tb_dlrm_mlet.yaml"), "--input", str(CRITEO_1TB), *extra]
    )


def test_criteo_1tb_mlet_fits_32_gpus_of_80gb(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert (
        _plan_1tb(tmp_path, "--world-size", "32", "--local-world-size", "8", "--hbm-gb", "80", "--output", str(out))
        == 0
    )
    plan = json.loads(out.read_text())
    tables = {t["table"]: t for t in plan["training"]["tables"]}
    assert len(tables) == 26 and plan["cluster"]["world_size"] == 32
    # the 40M-row tables at k=512 cannot sit on one GPU: they are split by rows
    assert "row_wise" in tables["t_C1"]["sharding_type"] and len(tables["t_C1"]["shards"]) > 1
    assert all(r["hbm_bytes"] < 80 * 2**30 for r in plan["training"]["ranks"])
    assert plan["memory"]["training_factor"] == pytest.approx(4.0)
    assert len(plan["serving"]["tables"]) == 26
    printed = capsys.readouterr().out
    assert "MLET memory factor 4.00x" in printed
    # one aligned row per table (rank ids, adaptive units), then one per rank with its host
    lines = printed.splitlines()
    start = lines.index("training model:") + 1
    table = lines[start : start + 2 + len(tables)]
    assert table[0].split() == ["table", "sharding", "kernel", "ranks", "HBM", "DDR"]
    assert len({len(line.rstrip()) for line in table[1:]}) <= 2  # the rule line and rows end in the same column
    row = next(line.split() for line in table if line.split()[0] == "t_C1")
    assert row[3] == rank_ids(tables["t_C1"]["ranks"]) and row[4:6] != ["0.00", "0.00"] and row[5] == "GiB"
    assert ["31", "3"] == next(
        line.split()[:2] for line in lines[start + 2 + len(tables) :] if line.split()[:1] == ["31"]
    )


def test_criteo_1tb_on_2_gpus_of_1gb_exits_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert _plan_1tb(tmp_path, "--world-size", "2", "--hbm-gb", "1", "--output", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mlet plan: error: the tables do not fit")
    assert "GiB short" in err and "rowwise_adagrad" in err and "w1_dtype=fp16" in err and "--world-size" in err
    assert not out.exists()


def test_uvm_caching_on_cpu_exits_2_with_one_line(tmp_path, capsys):
    assert _plan_1tb(tmp_path, "--world-size", "2", "--device", "cpu", "embedding.uvm_caching=true") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "uvm_caching" in err and "CUDA" in err.upper()


@pytest.fixture(scope="module")
def tiny_plan(synth_dataset):
    data = synth_dataset()
    cfg = load_config(TINY, [f"data.path={data}"])
    meta = DatasetMeta.load(data)
    return cfg, meta, make_plan(cfg, meta, Cluster(world_size=2, device="cpu", ddr_gb=4))


def test_load_plan_refuses_another_run(tiny_plan, tmp_path):
    cfg, meta, plan = tiny_plan
    path = write_plan(plan, tmp_path / "plan.json")
    assert load_plan(path, cfg, meta, 2, "cpu", 2).plan  # the run it was made for
    with pytest.raises(PlanError, match="made for 2 ranks but this run has 4"):
        load_plan(path, cfg, meta, 4, "cpu", 4)
    with pytest.raises(PlanError, match="made for --device cpu"):
        load_plan(path, cfg, meta, 2, "cuda", 2)
    other = load_config(TINY, [f"data.path={cfg.data.path}", "embedding.k=32"])
    with pytest.raises(PlanError, match="embedding.k=16"):
        load_plan(path, other, meta, 2, "cpu", 2)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not a readable JSON plan"):
        load_plan(tmp_path / "bad.json", cfg, meta, 2, "cpu", 2)


def test_write_plan_never_replaces_a_foreign_file(tiny_plan, tmp_path):
    _, _, plan = tiny_plan
    foreign = tmp_path / "notes.json"
    foreign.write_text("mine")
    with pytest.raises(OutputError, match="mlet did not write it"):
        write_plan(plan, foreign, overwrite=True)
    with pytest.raises(OutputError, match="not a file"):
        write_plan(plan, tmp_path, overwrite=True)
    assert foreign.read_text() == "mine"
    ours = write_plan(plan, tmp_path / "plan.json")
    with pytest.raises(OutputError, match="--overwrite"):
        write_plan(plan, ours)
    write_plan(plan, ours, overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


@pytest.mark.slow
def test_plan_round_trips_through_train_on_2_cpu_ranks(synth_dataset, tmp_path, capsys):
    data = synth_dataset()
    plan_path = tmp_path / "plan.json"
    flags = ["--config", str(TINY), "--input", str(data)]
    overrides = ["embedding.tables.C1.sharding=table_wise", "run.device=cpu"]
    assert (
        main(
            [
                "plan",
                *flags,
                "--world-size",
                "2",
                "--device",
                "cpu",
                "--ddr-gb",
                "4",
                "--output",
                str(plan_path),
                *overrides,
            ]
        )
        == 0
    )
    plan = json.loads(plan_path.read_text())
    # move t_C1 to the other rank: a run that planned again would not put it there
    c1 = next(t for t in plan["training"]["tables"] if t["table"] == "t_C1")
    moved = 1 - c1["ranks"][0]
    c1["ranks"], c1["shards"][0]["placement"] = [moved], f"rank:{moved}/cpu"
    plan_path.write_text(json.dumps(plan))
    planned = {t["table"]: t for t in plan["training"]["tables"]}
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *flags,
                "--output",
                str(run),
                "--nproc-per-node",
                "2",
                "--plan",
                str(plan_path),
                *overrides,
                "train.max_steps=4",
            ]
        )
        == 0
    )
    used = json.loads((run / "plan.json").read_text())
    assert len(used) == len(planned)
    for key, p in used.items():
        table = key.rsplit(".", 1)[1]
        assert (p["sharding_type"], p["compute_kernel"], p["ranks"]) == (
            planned[table]["sharding_type"],
            planned[table]["compute_kernel"],
            planned[table]["ranks"],
        )
    assert used[next(k for k in used if k.endswith(".t_C1"))]["ranks"] == [moved]
    assert (run / "metrics.json").is_file()
    capsys.readouterr()
    # the same plan refused for another world size: one line, exit 2, before any training
    assert (
        main(
            [
                "train",
                *flags,
                "--output",
                str(tmp_path / "run1"),
                "--plan",
                str(plan_path),
                *overrides,
                "train.max_steps=2",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "made for 2 ranks but this run has 1" in err


def test_cluster_flags_are_checked():
    with pytest.raises(UserError, match="divide"):
        Cluster(world_size=6, local_world_size=4)
    with pytest.raises(UserError, match="positive"):
        Cluster(world_size=2, hbm_gb=0)


def test_memory_levers_are_kernel_constraints():
    from mlet_torchrec.training.distributed import sharding_constraints

    features, table_of = ["a", "b"], {"a": "t_a", "b": "t_b"}
    emb = load_config(None, ["embedding.uvm_caching=true", "embedding.uvm_cache_load_factor=0.5"]).embedding
    cuda = sharding_constraints(emb, features, table_of, 2, "cuda")
    assert "fused_uvm_caching" in cuda["t_a"].compute_kernels and cuda["t_a"].cache_params.load_factor == 0.5
    with pytest.raises(UserError, match="uvm_caching=true needs CUDA"):
        sharding_constraints(emb, features, table_of, 2, "cpu")
    plain = sharding_constraints(load_config(None, []).embedding, features, table_of, 2, "cuda")
    assert "fused_uvm_caching" not in plain["t_a"].compute_kernels  # every table stays in GPU memory
    half = sharding_constraints(load_config(None, ["embedding.w1_dtype=fp16"]).embedding, features, table_of, 2, "cpu")
    assert "data_parallel" not in half["t_a"].sharding_types  # fp16 tables train on the fused kernels only
