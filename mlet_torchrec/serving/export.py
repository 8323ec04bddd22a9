"""Serving exports of a collapse output: TorchRec's INT8 inference model and plain per-table files.

``mlet export --collapsed DIR --output OUT --int8`` builds TorchRec's quantized inference model
(``torchrec.inference.modules.quantize_inference_model``: every table of the stock
``EmbeddingBagCollection`` becomes a ``QuantEmbeddingBagCollection`` with row-wise INT8 weights
run by FBGEMM's inference kernels) from the collapsed model, so INT8 is applied after collapse,
and saves it as TorchScript (``model_int8.pt``). It then checks the INT8 model against the FP32
collapsed model on the test split (AUC within 0.001, both reported) unless ``--no-check``.

``--format npy`` / ``--format safetensors`` writes every d-dim table for consumers outside
TorchRec (``tables/<table>.npy``, or one ``tables.safetensors`` whose ``__metadata__`` holds the
manifest's table entries). Tables are streamed from the DCP checkpoint into memory-mapped files,
one table at a time.

How to load and call the INT8 model, and how to load the FP32 collapsed model with stock TorchRec
without this package: ``SERVING_MD`` below, also written to ``OUT/SERVING.md`` (the tests run
its code blocks as written).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from data_pipes.schema import METADATA_FILE, DatasetMeta
from mlet_torchrec.errors import UserError
from mlet_torchrec.evaluation.evaluate import score_split
from mlet_torchrec.evaluation.metrics import MetricAccumulator
from mlet_torchrec.io import atomic_output
from mlet_torchrec.models import CTRModel
from mlet_torchrec.serving.artifact import (  # noqa: F401  (read_manifest, meta_from_manifest re-exported)
    MANIFEST,
    STATE_ROOT,
    load_artifact,
    meta_from_manifest,
    read_manifest,
)

COMMAND = "mlet export"
INT8_MODEL = "model_int8.pt"
TABLES_DIR = "tables"
SAFETENSORS_FILE = "tables.safetensors"
REPORT_FILE = "export_report.json"
SERVING_DOC = "SERVING.md"
FORMATS = ("npy", "safetensors")

SERVING_MD = """# Serving an `mlet export`

## The INT8 model (TorchRec's quantized inference model, TorchScript)

```python
import json, torch
import torchrec  # registers FBGEMM's INT8 embedding kernels with TorchScript
from torchrec import KeyedJaggedTensor

EXPORT = "path/to/export"  # the directory `mlet export --int8` wrote
manifest = json.load(open(f"{EXPORT}/manifest.json"))
model = torch.jit.load(f"{EXPORT}/model_int8.pt")
# a batch of 2 rows: dense features (2, #dense) float32, one id per sparse feature and row
keys = manifest["sparse_features"]
dense = torch.zeros(2, len(manifest["dense_features"]))
sparse = KeyedJaggedTensor.from_lengths_sync(
    keys=keys, values=torch.zeros(2 * len(keys), dtype=torch.int64),
    lengths=torch.ones(2 * len(keys), dtype=torch.int64))
probs = torch.sigmoid(model(dense, sparse).squeeze(-1))  # (2,) click probabilities
```

Sparse features go in the manifest's `sparse_features` order; bags of several ids (lengths > 1) are
pooled as the manifest's `pooling` says.

## The FP32 collapsed model with stock TorchRec (any world size: DCP reshards)

```python
import json, torch, torch.distributed.checkpoint as dcp
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType

COLLAPSED = "path/to/collapsed"  # the directory `mlet collapse` wrote
m = json.load(open(f"{COLLAPSED}/manifest.json"))
ebc = EmbeddingBagCollection(tables=[
    EmbeddingBagConfig(name=name, embedding_dim=t["d"], num_embeddings=t["rows"],
                       feature_names=t["features"], pooling=PoolingType[t["pooling"].upper()])
    for name, t in m["tables"].items()])
prefix = m["state_dict"]["embedding_bag_collection"]  # "model.net.sparse_arch.embedding_bag_collection."
state = {prefix + k: v for k, v in ebc.state_dict().items()}  # a DMP-sharded EBC's ShardedTensors work too
dcp.load(state, checkpoint_id=COLLAPSED)  # in a job: on every rank, with its own shards
```

The whole model is `torchrec.models.dlrm.DLRM(ebc, **m["architecture"])`, its keys under
`m["state_dict"]["model_prefix"]`. `tables.safetensors` / `tables/<table>.npy` (from `--format`) hold
the same d-dim tables as float32 (n, d) arrays.
"""


class Int8QualityError(ValueError):
    """The INT8 model's AUC is further from the FP32 model's than the tolerance."""


@dataclass
class ExportReport:
    output: str
    collapsed: str
    int8_model: str | None = None
    int8_table_bytes: int = 0
    fp32_table_bytes: int = 0
    table_files: dict[str, str] = field(default_factory=dict)
    check_split: str | None = None
    rows_checked: int = 0
    fp32_metrics: dict[str, float] = field(default_factory=dict)
    int8_metrics: dict[str, float] = field(default_factory=dict)
    auc_diff: float | None = None
    auc_tolerance: float = 1e-3
    max_abs_prob_diff: float | None = None
    seconds: float = 0.0


def load_collapsed_model(collapsed: Path | str) -> tuple[CTRModel, dict[str, Any]]:
    """The collapsed FP32 model (stock EBC) and its manifest; the data set is not needed."""
    art = load_artifact(collapsed)
    if art.kind != "collapsed":
        raise UserError(f"{collapsed}: no {MANIFEST}; is it the output of `mlet collapse`?")
    return art.materialize(), art.info


# --------------------------------------------------------------------------------------------
# INT8


def build_int8(model: CTRModel) -> torch.jit.ScriptModule:
    """TorchRec's quantized inference model of the collapsed model's net, as TorchScript.

    ``forward(dense_features, sparse_features: KeyedJaggedTensor) -> logits (B, 1)``.
    """
    from torchrec.fx import symbolic_trace
    from torchrec.inference.modules import quantize_inference_model

    net = copy.deepcopy(model.net).eval()
    hints = typing.get_type_hints(type(net).forward)  # string annotations (PEP 563) resolved
    quantized = quantize_inference_model(net)
    graph_module = symbolic_trace(quantized)
    for node in graph_module.graph.nodes:  # FX copies annotations as written; TorchScript needs the types
        if node.op == "placeholder" and node.target in hints:
            node.type = hints[node.target]
        elif node.op == "output" and "return" in hints:
            node.type = hints["return"]
    graph_module.recompile()
    scripted: torch.jit.ScriptModule = torch.jit.script(graph_module)
    return scripted


def load_int8(path: Path | str) -> torch.jit.ScriptModule:
    """``torch.jit.load`` of an exported INT8 model (importing torchrec registers the FBGEMM ops)."""
    import torchrec  # noqa: F401

    # torch.jit.load has no annotations
    loaded: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    return loaded


class _Logits(nn.Module):
    """(dense, sparse) -> logits (B,) around a (B, 1) net, as ``evaluate.score`` expects."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, dense: torch.Tensor, sparse: Any) -> torch.Tensor:
        logits: torch.Tensor = self.net(dense, sparse).squeeze(-1)
        return logits


def _int8_table_bytes(scripted: torch.jit.ScriptModule) -> int:
    """Bytes of the INT8 kernels' weight buffers (rows with their scale/bias, as FBGEMM aligns them)."""
    return sum(
        v.numel() * v.element_size()
        for k, v in scripted.state_dict().items()
        if k.rsplit(".", 1)[-1] in ("weights_host", "weights_dev", "weights_uvm")
    )


# --------------------------------------------------------------------------------------------
# plain per-table files


def _table_holder(
    shape: tuple[int, int], path: Path, offset: int = 0, npy: bool = False
) -> tuple[np.memmap[Any, np.dtype[np.float32]], torch.Tensor]:
    if npy:
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    else:
        mm = np.memmap(path, dtype=np.float32, mode="r+", offset=offset, shape=shape)
    return mm, torch.from_numpy(mm) if mm.size else torch.empty(shape)


def _load_table_into(collapsed: Path, key: str, target: torch.Tensor) -> None:
    prefix = f"{STATE_ROOT}."
    dcp.load({STATE_ROOT: {key[len(prefix) :]: target}}, checkpoint_id=str(collapsed), no_dist=True)


def export_tables(collapsed: Path | str, output: Path | str, fmt: str) -> dict[str, str]:
    """Every d-dim table as ``.npy`` files or one ``.safetensors`` file; returns table -> file (relative)."""
    if fmt not in FORMATS:
        raise UserError(f"table format {fmt!r} is not one of {FORMATS}")
    collapsed, output = Path(collapsed), Path(output)
    man = read_manifest(collapsed)
    tables = {**man["tables"], **man.get("extra_tables", {})}  # extra: e.g. the DeepCTR models' lin_* tables
    files: dict[str, str] = {}
    if fmt == "npy":
        (output / TABLES_DIR).mkdir(parents=True, exist_ok=True)
        for name, t in tables.items():
            rel = f"{TABLES_DIR}/{name}.npy"
            mm, target = _table_holder((t["rows"], t["d"]), output / rel, npy=True)
            _load_table_into(collapsed, t["key"], target)
            mm.flush()
            del mm, target
            files[name] = rel
        return files

    # safetensors: 8-byte little-endian header length, JSON header, then the raw row-major data
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tables.items():
        nbytes = t["rows"] * t["d"] * 4
        header[name] = {"dtype": "F32", "shape": [t["rows"], t["d"]], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {
        "format": "mlet-torchrec collapsed tables",
        "tables": json.dumps({n: {k: v for k, v in t.items() if k != "key"} for n, t in tables.items()}),
        "source_checkpoint": json.dumps(man.get("source_checkpoint", {})),
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    path = output / SAFETENSORS_FILE
    output.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    for name, t in tables.items():
        begin = header[name]["data_offsets"][0]
        mm, target = _table_holder((t["rows"], t["d"]), path, offset=8 + len(raw) + begin)
        _load_table_into(collapsed, t["key"], target)
        mm.flush()
        del mm, target
        files[name] = SAFETENSORS_FILE
    return files


def read_safetensors(path: Path | str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A minimal reader of (float32) safetensors files: (tensors as memory maps, ``__metadata__``)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    meta = header.pop("__metadata__", {})
    out = {}
    for name, h in header.items():
        if h["dtype"] != "F32":
            raise ValueError(f"{path}: {name} has dtype {h['dtype']}; this reader knows F32")
        b, e = h["data_offsets"]
        shape = tuple(h["shape"])
        out[name] = (
            np.memmap(path, dtype=np.float32, mode="r", offset=8 + size + b, shape=shape)
            if e > b
            else np.zeros(shape, np.float32)
        )
    return out, meta


# --------------------------------------------------------------------------------------------
# the command


def export(
    collapsed: Path | str,
    output: Path | str,
    int8: bool = True,
    formats: Sequence[str] = (),
    check: bool = True,
    split: str = "test",
    max_check_rows: int | None = None,
    auc_tolerance: float = 1e-3,
    overwrite: bool = False,
    nproc_per_node: int = 1,
) -> ExportReport:
    """Export ``collapsed`` (a ``mlet collapse`` output) for serving into ``output``.

    ``nproc_per_node`` > 1 runs the INT8 check on that many local processes, each scoring its slice of
    the split (the FP32 model sharded over them, the INT8 model in each).
    """
    start = time.perf_counter()
    collapsed, output = Path(collapsed), Path(output)
    if not int8 and not formats:
        raise UserError("nothing to export: ask for --int8 and/or --format npy|safetensors")
    for fmt in formats:
        if fmt not in FORMATS:
            raise UserError(f"table format {fmt!r} is not one of {FORMATS}")
    if not (collapsed / MANIFEST).is_file():
        raise UserError(f"{collapsed}: no {MANIFEST}; is it the output of `mlet collapse`?")
    art = load_artifact(collapsed)
    man, config, data = art.info, art.config, art.config.data.path
    if int8 and check:
        if not (Path(data) / METADATA_FILE).is_file():
            raise UserError(
                f"the INT8 quality check needs the {split} split of the data set {data} (from the run config), "
                "which is not there; pass --no-check to export without the check"
            )
        if split not in art.meta.splits:
            raise UserError(f"data set {data} has no split {split!r}; pass --split or --no-check")

    report = ExportReport(output=str(output), collapsed=str(collapsed), auc_tolerance=auc_tolerance)
    report.fp32_table_bytes = sum(
        t["rows"] * t["d"] * 4 for t in [*man["tables"].values(), *man.get("extra_tables", {}).values()]
    )
    with atomic_output(output, COMMAND, inputs=[collapsed, data], overwrite=overwrite) as tmp:
        for fmt in formats:
            report.table_files.update({f"{fmt}:{k}": v for k, v in export_tables(collapsed, tmp, fmt).items()})
        out_manifest = dict(man)
        if int8:
            model = art.materialize()
            scripted = build_int8(model)
            scripted.save(str(tmp / INT8_MODEL))
            report.int8_model = INT8_MODEL
            report.int8_table_bytes = _int8_table_bytes(scripted)
            out_manifest["int8"] = {
                "file": INT8_MODEL,
                "builder": "torchrec.inference.modules.quantize_inference_model",
                "weights": "row-wise INT8 with per-row scale and bias (FBGEMM IntNBit TBE)",
                "table_bytes": report.int8_table_bytes,
                "forward": "(dense_features float32 (B, D), sparse_features KeyedJaggedTensor) -> logits (B, 1)",
            }
            if check:
                if nproc_per_node > 1:
                    found = int8_check_local(collapsed, tmp / INT8_MODEL, split, max_check_rows, nproc_per_node)
                else:
                    found = int8_check(
                        model,
                        _Logits(load_int8(tmp / INT8_MODEL)),
                        data,
                        split,
                        art.meta,
                        config.train.eval_batch_size,
                        max_check_rows,
                    )
                _judge_int8(report, found, split, auc_tolerance)
        if report.table_files:
            out_manifest["table_files"] = report.table_files
        (tmp / MANIFEST).write_text(json.dumps(out_manifest, indent=2))
        shutil.copy(collapsed / "config.yaml", tmp / "config.yaml")
        (tmp / SERVING_DOC).write_text(SERVING_MD)
        report.seconds = time.perf_counter() - start
        (tmp / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
    return report


def int8_check(
    model: nn.Module,
    reloaded: nn.Module,
    data: str,
    split: str,
    meta: DatasetMeta,
    batch: int,
    max_rows: int | None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """FP32 against the INT8 model as written (reloaded from its file) on ``split``, both scoring each batch in
    one pass: {rows, fp32 metrics, int8 metrics, max |p_int8 - p_fp32|}. Collective when ``world_size`` > 1."""
    import torch.distributed as dist

    acc32, acc8, worst = MetricAccumulator(), MetricAccumulator(), 0.0
    for out in score_split([model, reloaded], data, split, batch, meta, max_rows, rank, world_size):
        if out.labels.numel():
            p32, p8 = torch.sigmoid(out.logits[0].double()), torch.sigmoid(out.logits[1].double())
            worst = max(worst, float((p32 - p8).abs().max()))
        acc32.update(out.logits[0], out.labels)
        acc8.update(out.logits[1], out.labels)
    m32, m8 = acc32.result(), acc8.result()
    if world_size > 1:
        from mlet_torchrec.evaluation.evaluate import eval_device

        stat = torch.tensor([worst], dtype=torch.float64, device=eval_device())
        dist.all_reduce(stat, op=dist.ReduceOp.MAX)
        worst = float(stat.item())
    return {"rows": m32.rows, "fp32": m32.as_dict(), "int8": m8.as_dict(), "max_abs_prob_diff": worst}


def _int8_check_job(collapsed: str, int8_file: str, split: str, max_rows: int | None) -> dict[str, Any]:
    """:func:`int8_check` as one rank of a job: the FP32 model sharded over the ranks, the INT8 model in each."""
    from mlet_torchrec.serving.artifact import shard_for_job
    from mlet_torchrec.training.distributed import process_group

    art = load_artifact(collapsed)
    with process_group(art.config.run.device) as ctx:
        model = shard_for_job(art, ctx.device, ctx.world_size)
        return int8_check(
            model,
            _Logits(load_int8(int8_file)),
            art.config.data.path,
            split,
            art.meta,
            art.config.train.eval_batch_size,
            max_rows,
            ctx.rank,
            ctx.world_size,
        )


def _int8_check_worker(args: dict[str, Any], verbose: bool, errors: str) -> dict[str, Any]:
    from mlet_torchrec.logs import configure_logging
    from mlet_torchrec.training.launcher import user_errors_to_parent

    configure_logging(verbose)
    with user_errors_to_parent(errors):
        return _int8_check_job(**args)


def int8_check_local(
    collapsed: Path | str, int8_file: Path | str, split: str, max_rows: int | None, nproc_per_node: int
) -> dict[str, Any]:
    """:func:`int8_check` on ``nproc_per_node`` local processes; rank 0's result."""
    from mlet_torchrec.training.launcher import launch_local, local_launch_config

    args = {"collapsed": str(collapsed), "int8_file": str(int8_file), "split": split, "max_rows": max_rows}
    results = launch_local(local_launch_config(nproc_per_node, "mlet-export-check"), _int8_check_worker, args, False)
    check: dict[str, Any] = results[0]
    return check


def _judge_int8(report: ExportReport, found: dict[str, Any], split: str, auc_tolerance: float) -> None:
    """Fill ``report`` from a check's result; raise when the INT8 AUC is off by more than the tolerance."""
    report.check_split = split
    report.rows_checked = int(found["rows"])
    report.fp32_metrics, report.int8_metrics = found["fp32"], found["int8"]
    report.auc_diff = abs(report.int8_metrics["auc"] - report.fp32_metrics["auc"])
    report.max_abs_prob_diff = float(found["max_abs_prob_diff"])
    if not report.auc_diff <= auc_tolerance:  # NaN fails too
        raise Int8QualityError(
            f"INT8 AUC {report.int8_metrics['auc']:.5f} is {report.auc_diff:.5f} from the FP32 AUC "
            f"{report.fp32_metrics['auc']:.5f} on {report.rows_checked} {split} rows "
            f"(tolerance {auc_tolerance:g}); the export was not written"
        )


def format_report(report: ExportReport) -> str:
    lines = [f"exported {report.collapsed} -> {report.output}"]
    if report.int8_model:
        lines.append(
            f"  INT8 model: {report.int8_model} ({report.int8_table_bytes / 2**20:.2f} MiB of tables "
            f"vs {report.fp32_table_bytes / 2**20:.2f} MiB FP32)"
        )
    if report.table_files:
        lines.append(f"  tables: {', '.join(sorted(set(report.table_files.values())))}")
    if report.check_split:
        lines.append(
            f"  {report.check_split} AUC: FP32 {report.fp32_metrics['auc']:.5f}  "
            f"INT8 {report.int8_metrics['auc']:.5f}  "
            f"|diff| {report.auc_diff:.5f} (tolerance {report.auc_tolerance:g}); LogLoss FP32 "
            f"{report.fp32_metrics['logloss']:.5f} INT8 {report.int8_metrics['logloss']:.5f}; "
            f"max |p_int8 - p_fp32| {report.max_abs_prob_diff:.2e} over {report.rows_checked} rows"
        )
    elif report.int8_model:
        lines.append("  INT8 quality check skipped")
    return "\n".join(lines)
