"""Distributed collapse on real gloo ranks, stock TorchRec loading at other world sizes, INT8 export.

One 2-rank training run shards its four W1 tables table-, row-, column- and row-wise. Then:
``mlet collapse --nproc-per-node 2`` must reproduce the single-process product (column-wise
partials summed across ranks); a 4-rank job collapses the same checkpoint again (another world
size, a planned row-wise output) and loads the 2-rank output into a stock TorchRec
``EmbeddingBagCollection`` sharded by TorchRec's own sharder over 4 ranks; the 4-rank output loads
in one process through the documented snippet; ``mlet export --int8 --nproc-per-node 2`` checks the INT8
model (each rank scoring its slice of the test split) and saves it, and the documented snippet calls it.
"""

import json
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from data_pipes.synth import SynthConfig, generate
from mlet_torchrec.config import load_config
from mlet_torchrec.models.registry import build_model
from mlet_torchrec.serving.artifact import load_collapsed, load_factored
from mlet_torchrec.serving.collapse import collapse_state_dict
from mlet_torchrec.training.launcher import run_local, train_local

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SHARDING = {"C1": "table_wise", "C2": "row_wise", "C3": "column_wise", "C4": "row_wise"}
EBC = "net.sparse_arch.embedding_bag_collection"


def _mlet(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "mlet_torchrec.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise AssertionError(f"mlet {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _snippet(markdown: str, index: int, replace: dict) -> str:
    """The index-th python block of a markdown text, with assignments replaced."""
    code = re.findall(r"```python\n(.*?)```", markdown, flags=re.S)[index]
    for old, new in replace.items():
        assert old in code, old
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("collapse_dist")
    data = root / "data"
    generate(
        SynthConfig(
            rows=4000,
            num_dense=3,
            num_sparse=4,
            min_cardinality=10,
            max_cardinality=3000,
            multi_hot_features=1,
            row_group_size=32,
            seed=5,
        ),
        data,
        progress=False,
    )
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={data}",
            f"run.dir={root / 'run'}",
            "embedding.d=8",
            "embedding.k=16",
            *[f"embedding.tables.{f}.sharding={s}" for f, s in SHARDING.items()],
            "train.batch_size=64",
            "train.epochs=1",
            "train.seed=3",
        ],
    )
    summary = train_local(cfg, 2)
    run = root / "run"
    plan = json.loads((run / "plan.json").read_text())
    for feature, kind in SHARDING.items():
        assert plan[f"{EBC}.w1.t_{feature}"]["sharding_type"] == kind
    factored, config, meta, _ = load_factored(run)
    reference = collapse_state_dict(factored, build_model(config.model, config.embedding, meta, collapsed=True))
    torch.save(reference, root / "reference.pt")
    return {"root": root, "run": run, "data": data, "summary": summary, "reference": reference}


@pytest.fixture(scope="module")
def collapsed2(trained):
    out = trained["root"] / "collapsed2"
    proc = _mlet("collapse", "--input", str(trained["run"]), "--output", str(out), "--nproc-per-node", "2")
    assert "max |p_collapsed - p_factored|" in proc.stdout
    return out


def _assert_equal_state(got: dict, reference: dict) -> None:
    assert set(got) == set(reference)
    for key, ref in reference.items():
        torch.testing.assert_close(got[key], ref, atol=1e-6, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_two_rank_collapse_is_exact(trained, collapsed2):
    report = json.loads((collapsed2 / "collapse_report.json").read_text())
    assert report["world_size"] == 2 and report["source_world_size"] == 2
    assert report["max_abs_diff"] <= 1e-5 and report["rows_checked"] == trained["summary"]["test"]["rows"]
    assert abs(report["collapsed_metrics"]["auc"] - trained["summary"]["test"]["auc"]) < 1e-5
    # the column-wise table's partial products crossed ranks; nothing else did
    n3 = json.loads((collapsed2 / "manifest.json").read_text())["tables"]["t_C3"]["rows"]
    assert report["sent_bytes"] == 2 * n3 * 4 * 4  # each rank sends its partial of the other's 4 columns

    plain, _, _ = load_collapsed(collapsed2)
    _assert_equal_state(plain.state_dict(), trained["reference"])

    layout = json.loads((collapsed2 / "plan.json").read_text())
    assert {b["placement"] for b in layout["t_C3"]} == {"rank:0", "rank:1"}  # d split like k was
    assert [b["sizes"][1] for b in layout["t_C3"]] == [4, 4]
    assert {b["placement"] for b in layout["t_C4"]} == {"rank:0", "rank:1"} and layout["t_C4"][0]["sizes"][1] == 8
    man = json.loads((collapsed2 / "manifest.json").read_text())
    assert man["collapse"]["world_size"] == 2 and man["k"] == 16 and man["d"] == 8
    assert len(man["source_checkpoint"]["dcp_metadata_sha256"]) == 64 and man["source_checkpoint"]["step"] > 0


def _four_rank_worker(run: str, collapsed2: str, out4: str, reference: str) -> list[dict]:
    """Rank r of 4: collapse again at world 4; then a stock sharded EBC loads the 2-rank output. Every rank's
    findings, in rank order."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.modules.embedding_configs import PoolingType

    from mlet_torchrec.serving.collapse import collapse
    from mlet_torchrec.training.distributed import init_distributed

    init_distributed("cpu")  # this worker's own group: collapse joins it and leaves it up for what follows
    report = collapse(run, out4, check_split=None, output_sharding="row_wise")

    # stock TorchRec only from here: tables from the manifest, TorchRec's own sharder and planner
    m = json.loads((Path(collapsed2) / "manifest.json").read_text())
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=n,
                embedding_dim=t["d"],
                num_embeddings=t["rows"],
                feature_names=t["features"],
                pooling=PoolingType[t["pooling"].upper()],
            )
            for n, t in m["tables"].items()
        ],
        device=torch.device("meta"),
    )
    kinds = {"t_C1": "data_parallel", "t_C2": "table_wise", "t_C3": "column_wise", "t_C4": "table_column_wise"}
    constraints = {n: ParameterConstraints(sharding_types=[k], min_partition=4) for n, k in kinds.items()}
    sharders = [EmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=4, compute_device="cpu"), constraints=constraints)
    plan = planner.collective_plan(ebc, sharders, dist.GroupMember.WORLD)
    model = DistributedModelParallel(module=ebc, device=torch.device("cpu"), plan=plan, sharders=sharders)
    prefix = m["state_dict"]["embedding_bag_collection"]
    state = {prefix + k: v for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=collapsed2)

    ref = torch.load(reference)
    worst, shards = 0.0, 0
    for key, value in model.state_dict().items():
        expected = ref[f"{EBC}.{key}"]
        if hasattr(value, "local_shards"):
            for shard in value.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                worst = max(worst, float((shard.tensor - expected[r0 : r0 + nr, c0 : c0 + nc]).abs().max()))
                shards += 1
        else:  # data_parallel: a full replica on every rank
            worst = max(worst, float((value - expected).abs().max()))
            shards += 1
    sharded_types = {t: p.sharding_type for t, p in plan.plan[""].items()}
    mine = {
        "max_diff": worst,
        "shards": shards,
        "types": sharded_types,
        "report_world": report.world_size,
        "sent": report.sent_bytes,
    }
    found: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(found, mine)
    return found


def test_stock_torchrec_loads_at_other_world_sizes(trained, collapsed2):
    root = trained["root"]
    out4 = root / "collapsed4"
    call = partial(_four_rank_worker, str(trained["run"]), str(collapsed2), str(out4), str(root / "reference.pt"))
    results = dict(enumerate(run_local(4, call)))
    assert set(results) == {0, 1, 2, 3}
    for r in results.values():
        assert r["max_diff"] <= 1e-6 and r["report_world"] == 4
    assert results[0]["types"] == {
        "t_C1": "data_parallel",
        "t_C2": "table_wise",
        "t_C3": "column_wise",
        "t_C4": "table_column_wise",
    }
    assert sum(r["shards"] for r in results.values()) >= 4 + 1 + 2
    assert results[0]["sent"] > 0  # trained at 2, collapsed at 4 into row-wise: rows moved between ranks

    # the 4-rank output: row-wise over 4 ranks, and it equals the reference when loaded in one process
    layout = json.loads((out4 / "plan.json").read_text())
    assert {b["placement"] for b in layout["t_C4"]} == {f"rank:{r}" for r in range(4)}
    plain, _, _ = load_collapsed(out4)
    _assert_equal_state(plain.state_dict(), trained["reference"])

    # the documented stock-TorchRec snippet, as written, at world size 1
    from mlet_torchrec.serving.artifact import read_manifest
    from mlet_torchrec.serving.serving_doc import serving_md

    scope: dict = {}
    exec(_snippet(serving_md(read_manifest(out4)), 1, {'"path/to/collapsed"': repr(str(out4))}), scope)
    for name, bag in scope["ebc"].embedding_bags.items():
        torch.testing.assert_close(
            bag.weight.detach(), trained["reference"][f"{EBC}.embedding_bags.{name}.weight"], atol=1e-6, rtol=1e-5
        )


def test_int8_export_of_the_trained_model(trained, collapsed2):
    out = trained["root"] / "export"
    proc = _mlet(
        "export",
        "--input",
        str(collapsed2),
        "--output",
        str(out),
        "--int8",
        "--format",
        "safetensors",
        "--nproc-per-node",
        "2",
    )
    assert "INT8" in proc.stdout and "AUC: FP32" in proc.stdout
    report = json.loads((out / "export_report.json").read_text())
    assert report["auc_diff"] <= 1e-3 and report["rows_checked"] == trained["summary"]["test"]["rows"]
    assert abs(report["fp32_metrics"]["auc"] - trained["summary"]["test"]["auc"]) < 1e-5
    assert 0 < report["int8_table_bytes"] < report["fp32_table_bytes"]

    from mlet_torchrec.serving.export import read_safetensors

    scope: dict = {}
    exec(_snippet((out / "SERVING.md").read_text(), 0, {'"path/to/export"': repr(str(out))}), scope)
    assert scope["probs"].shape == (2,) and bool(((scope["probs"] > 0) & (scope["probs"] < 1)).all())
    tables, meta = read_safetensors(out / "tables.safetensors")
    plain = load_collapsed(collapsed2)[0].state_dict()
    for name, array in tables.items():  # the very tables of the collapsed checkpoint
        assert torch.equal(torch.from_numpy(array.copy()), plain[f"{EBC}.embedding_bags.{name}.weight"])
    assert json.loads(meta["tables"])["t_C3"]["k"] == 16
