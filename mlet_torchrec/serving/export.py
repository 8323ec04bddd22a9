"""Serving exports of a collapse output: TorchRec's inference package and plain per-table files.

Every export holds the FP32 model with TorchRec's dict signature as TorchScript (``predict_fp32.pt``;
see :mod:`mlet_torchrec.serving.torchrec_package`). ``mlet export --input DIR --output OUT --int8`` also
builds TorchRec's quantized inference model (``torchrec.inference.modules.quantize_inference_model``:
every table of the stock ``EmbeddingBagCollection`` becomes a ``QuantEmbeddingBagCollection`` with
row-wise INT8 weights run by FBGEMM's inference kernels), so INT8 is applied after collapse
(``predict_int8.pt``), and checks it against the FP32 collapsed model on the test split (AUC within
0.001, both reported) unless ``--no-check``. ``--shards N`` adds the INT8 model sharded table-wise over
N devices by ``shard_quant_model`` (``predict_int8_shardsN.pt``), checked against the unsharded one.

``--format npy`` / ``--format safetensors`` writes every d-dim table for consumers outside
TorchRec (``tables/<table>.npy``, or one ``tables.safetensors`` whose ``__metadata__`` holds the
manifest's table entries). Tables are streamed from the DCP checkpoint into memory-mapped files,
one table at a time.

How to load and call the modules, and how to load the FP32 collapsed model with stock TorchRec without
this package: ``OUT/SERVING.md``, written for the export's model by
:func:`mlet_torchrec.serving.serving_doc.serving_md` (the tests run its code blocks as written).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagCollection

from data_pipes.schema import METADATA_FILE, DatasetMeta
from data_pipes.transform import carry_transform
from mlet_torchrec import ranks
from mlet_torchrec.errors import UserError
from mlet_torchrec.evaluation.evaluate import score_split
from mlet_torchrec.evaluation.metrics import MetricAccumulator
from mlet_torchrec.files import reserve
from mlet_torchrec.io import atomic_output, output_command
from mlet_torchrec.logs import human_bytes
from mlet_torchrec.models.registry import CTRModel
from mlet_torchrec.names import path_inside
from mlet_torchrec.options import AUC_TOLERANCE, EXPORT_FORMATS
from mlet_torchrec.serving.artifact import (
    MANIFEST,
    STATE_ROOT,
    Artifact,
    load_artifact,
    read_manifest,
    shard_for_job,
)
from mlet_torchrec.serving.collapse import COMMAND as COLLAPSE_COMMAND
from mlet_torchrec.serving.serving_doc import serving_md
from mlet_torchrec.serving.torchrec_package import (
    PREDICT_FP32,
    PREDICT_INT8,
    SHARDED_TOLERANCE,
    DictLogits,
    MLETPredictFactory,
    batch_from_ids,
    load_predict_module,
    save_predict_module,
    sharded_file,
)
from mlet_torchrec.training import safe_dcp
from mlet_torchrec.training.table_size import fp32_table_bytes

if TYPE_CHECKING:
    from mlet_torchrec.training.distributed import DistContext

COMMAND = "mlet export"
TABLES_DIR = "tables"
SAFETENSORS_FILE = "tables.safetensors"
REPORT_FILE = "export_report.json"
SERVING_DOC = "SERVING.md"


class Int8QualityError(ValueError):
    """The INT8 model's AUC is further from the FP32 model's than the tolerance."""


@dataclass
class ExportReport:
    output: str
    collapsed: str
    fp32_model: str | None = None
    int8_model: str | None = None
    sharded_model: str | None = None
    sharded_max_abs_prob_diff: float | None = None
    int8_table_bytes: int = 0
    fp32_table_bytes: int = 0
    table_files: dict[str, str] = field(default_factory=dict)
    check_split: str | None = None
    rows_checked: int = 0
    fp32_metrics: dict[str, float] = field(default_factory=dict)
    int8_metrics: dict[str, float] = field(default_factory=dict)
    auc_diff: float | None = None
    auc_tolerance: float = AUC_TOLERANCE
    max_abs_prob_diff: float | None = None
    seconds: float = 0.0


def load_collapsed_model(collapsed: Path | str) -> tuple[CTRModel, dict[str, Any]]:
    """The collapsed FP32 model (stock EBC) and its manifest; the data set is not needed."""
    art = load_artifact(collapsed)
    if art.kind != "collapsed":
        raise UserError(f"{collapsed}: no {MANIFEST}; is it the output of `mlet collapse`?")
    return art.materialize(), art.info


# --------------------------------------------------------------------------------------------
# plain per-table files


def _table_holder(
    shape: tuple[int, int], path: Path, offset: int = 0, npy: bool = False
) -> tuple[np.memmap[Any, np.dtype[np.float32]], torch.Tensor]:
    if npy:
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        reserve(path)
    else:
        mm = np.memmap(path, dtype=np.float32, mode="r+", offset=offset, shape=shape)
    return mm, torch.from_numpy(mm) if mm.size else torch.empty(shape)


def _load_table_into(collapsed: Path, key: str, target: torch.Tensor) -> None:
    prefix = f"{STATE_ROOT}."
    safe_dcp.load({STATE_ROOT: {key[len(prefix) :]: target}}, collapsed, no_dist=True)


def export_tables(collapsed: Path | str, output: Path | str, fmt: str) -> dict[str, str]:
    """Every d-dim table as ``.npy`` files or one ``.safetensors`` file; returns table -> file (relative)."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"table format {fmt!r} is not one of {EXPORT_FORMATS}")
    collapsed, output = Path(collapsed), Path(output)
    man = read_manifest(collapsed)
    tables = {**man["tables"], **man.get("extra_tables", {})}  # extra: e.g. the DeepCTR models' lin_* tables
    files: dict[str, str] = {}
    if fmt == "npy":
        (output / TABLES_DIR).mkdir(parents=True, exist_ok=True)
        for name, t in tables.items():
            rel = f"{TABLES_DIR}/{name}.npy"
            mm, target = _table_holder((t["rows"], t["d"]), path_inside(output, rel, "table file"), npy=True)
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
    reserve(path)
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
    auc_tolerance: float = AUC_TOLERANCE,
    overwrite: bool = False,
    shards: int = 0,
) -> ExportReport:
    """Export ``collapsed`` (a ``mlet collapse`` output) for serving into ``output``.

    Runs in one process or as every rank of a job (torchrun, TorchX, ``mlet export --nproc-per-node N``; call it
    on every rank alike, every rank returns the same report): rank 0 writes the modules and tables, then every
    rank scores its slice of the split in the INT8 check (the FP32 model sharded over the ranks, the INT8 model
    in each), and rank 0 commits the output. ``shards`` > 0 also writes the INT8 model sharded table-wise over
    that many devices by ``shard_quant_model``, checked against the unsharded one.
    """
    from mlet_torchrec.training.distributed import process_group

    start = time.perf_counter()
    collapsed, output = Path(collapsed), Path(output)
    art = _checked_source(collapsed, int8, formats, check, split, shards)
    data = art.config.data.path
    report = ExportReport(output=str(output), collapsed=str(collapsed), auc_tolerance=auc_tolerance)
    tables = [*art.info["tables"].values(), *art.info.get("extra_tables", {}).values()]
    report.fp32_table_bytes = sum(fp32_table_bytes(t["rows"], t["d"]) for t in tables)
    with (
        process_group(art.config.run.device) as ctx,
        atomic_output(output, COMMAND, [collapsed, data], overwrite, ranks=ranks) as tmp,
    ):
        model = art.materialize() if ctx.is_main else None
        out_manifest = _write_models(art, model, tmp, int8, formats, shards, report) if model is not None else {}
        if int8 and check:
            ranks.barrier()  # rank 0 has written the INT8 module
            whole, model = (model if ctx.world_size == 1 else None), None  # a job shards the FP32 model instead
            found = _int8_check_on_ranks(art, whole, tmp / PREDICT_INT8, split, max_check_rows, ctx)
            _judge_int8(report, found, split, auc_tolerance)  # every rank: the same figures, the same verdict
        if ctx.is_main:
            out_manifest["transform_identity"] = carry_transform(collapsed, tmp)
            (tmp / MANIFEST).write_text(json.dumps(out_manifest, indent=2))
            shutil.copy(collapsed / "config.yaml", tmp / "config.yaml")
            (tmp / SERVING_DOC).write_text(serving_md(out_manifest))
            report.seconds = time.perf_counter() - start
            (tmp / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
        report = ranks.from_main(report)  # what rank 0 wrote, on every rank
    return report


def _checked_source(
    collapsed: Path, int8: bool, formats: Sequence[str], check: bool, split: str, shards: int
) -> Artifact:
    """The collapsed artifact to export, once the request is valid (a ``UserError`` names what is not)."""
    if shards and not int8:
        raise UserError("--shards shards the INT8 model: add --int8")
    if shards < 0:
        raise UserError(f"--shards {shards}: give a number of devices >= 1")
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise UserError(f"table format {fmt!r} is not one of {EXPORT_FORMATS}")
    made_by = output_command(collapsed)
    if not (collapsed / MANIFEST).is_file() or made_by not in (None, COLLAPSE_COMMAND):
        what = f"an output of `{made_by}`" if made_by else f"no {MANIFEST}"
        raise UserError(f"{collapsed}: {what}; mlet export takes the output of `mlet collapse`")
    art = load_artifact(collapsed)
    ebc = art.model.embeddings
    tables = len(ebc.embedding_bag_configs()) if isinstance(ebc, EmbeddingBagCollection) else 1
    if shards > tables:
        raise UserError(
            f"--shards {shards}: the model has {tables} tables and shards them table-wise, so at most {tables} "
            "devices hold any; give --shards of at most that"
        )
    data = art.config.data.path
    if int8 and check:
        if not (Path(data) / METADATA_FILE).is_file():
            raise UserError(
                f"the INT8 quality check needs the {split} split of the data set {data} (from the run config), "
                "which is not there; pass --no-check to export without the check"
            )
        if split not in art.meta.splits:
            raise UserError(f"data set {data} has no split {split!r}; pass --split or --no-check")
    return art


def _write_models(
    art: Artifact, model: CTRModel, tmp: Path, int8: bool, formats: Sequence[str], shards: int, report: ExportReport
) -> dict[str, Any]:
    """The table files and TorchRec's inference modules into ``tmp``; the output manifest so far."""
    for fmt in formats:
        report.table_files.update({f"{fmt}:{k}": v for k, v in export_tables(art.path, tmp, fmt).items()})
    out_manifest = dict(art.info)
    out_manifest["net_class"] = f"{type(model.net).__module__}.{type(model.net).__qualname__}"
    out_manifest["predict_modules"] = write_predict_modules(model, art.meta, tmp, int8, shards, report)
    if report.table_files:
        out_manifest["table_files"] = report.table_files
    return out_manifest


def write_predict_modules(
    model: CTRModel, meta: DatasetMeta, out: Path, int8: bool, shards: int, report: ExportReport
) -> dict[str, Any]:
    """TorchRec's inference package into ``out``: the FP32 dict-signature module, with ``int8`` the INT8 one,
    with ``shards`` the INT8 one sharded (checked against the unsharded one). Returns the manifest's entries."""
    keys, num_dense = meta.sparse_names(), len(meta.dense)
    entries: dict[str, Any] = {}
    fp32 = MLETPredictFactory(model.net, keys, num_dense)
    save_predict_module(fp32, out / PREDICT_FP32)
    entries["fp32"] = {"file": PREDICT_FP32, **fp32.describe()}
    report.fp32_model = PREDICT_FP32
    if not int8:
        return entries
    factory = MLETPredictFactory(model.net, keys, num_dense, int8=True)
    save_predict_module(factory, out / PREDICT_INT8)
    report.int8_model, report.int8_table_bytes = PREDICT_INT8, factory.table_bytes
    entries["int8"] = {"file": PREDICT_INT8, **factory.describe()}
    if shards:
        sharded_factory = MLETPredictFactory(model.net, keys, num_dense, int8=True, shards=shards)
        name = sharded_file(shards)
        save_predict_module(sharded_factory, out / name)
        diff = _max_prob_diff(load_predict_module(out / PREDICT_INT8), load_predict_module(out / name), meta)
        if not diff <= SHARDED_TOLERANCE:
            raise ValueError(f"the model sharded over {shards} devices is {diff:.2e} from the unsharded INT8 model")
        report.sharded_model, report.sharded_max_abs_prob_diff = name, diff
        entries[f"int8_shards{shards}"] = {
            "file": name,
            "max_abs_prob_diff_to_int8": diff,
            **sharded_factory.describe(),
        }
    return entries


def _max_prob_diff(a: nn.Module, b: nn.Module, meta: DatasetMeta, rows: int = 512, seed: int = 0) -> float:
    """max |p_a - p_b| of two dict-signature modules on ``rows`` random rows (every table's ids drawn)."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, len(meta.dense), generator=g)
    ids = torch.stack([torch.randint(0, f.cardinality, (rows,), generator=g) for f in meta.sparse], dim=1)
    batch = batch_from_ids(dense, ids)
    with torch.no_grad():
        return float((a(batch)["default"].double() - b(batch)["default"].double()).abs().max())


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


def _int8_check_on_ranks(
    art: Artifact, model: CTRModel | None, int8_file: Path, split: str, max_rows: int | None, ctx: DistContext
) -> dict[str, Any]:
    """:func:`int8_check` on this rank of ``ctx``'s group: the FP32 ``model``, or with ``None`` the FP32 model
    sharded over the ranks (collective); the INT8 model from ``int8_file`` in each."""
    fp32 = model if model is not None else shard_for_job(load_artifact(art.path), ctx.device, ctx.world_size)
    return int8_check(
        fp32,
        DictLogits(load_predict_module(int8_file)),
        art.config.data.path,
        split,
        art.meta,
        art.config.train.eval_batch_size,
        max_rows,
        ctx.rank,
        ctx.world_size,
    )


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
    if report.fp32_model:
        lines.append(f"  FP32 model: {report.fp32_model} (TorchRec dict signature, TorchScript)")
    if report.int8_model:
        lines.append(
            f"  INT8 model: {report.int8_model} ({human_bytes(report.int8_table_bytes)} of tables "
            f"vs {human_bytes(report.fp32_table_bytes)} FP32)"
        )
    if report.sharded_model:
        lines.append(
            f"  sharded INT8 model: {report.sharded_model} "
            f"(max |p_sharded - p_int8| {report.sharded_max_abs_prob_diff:.1e} on 512 random rows)"
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
