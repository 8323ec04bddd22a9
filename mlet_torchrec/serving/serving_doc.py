"""``SERVING.md`` of an export, written for its model from its manifest (the tests run its code blocks as written).

Python blocks, in order: (0) TorchRec's dict-signature modules, (1) the collapsed tables with stock TorchRec,
and for DLRM (2) the whole model as ``torchrec.models.dlrm.DLRM``. Paths are placeholders
(``"path/to/export"``, ``"path/to/collapsed"``).

Example:
    >>> man = {"model": "dlrm", "net_class": "torchrec.models.dlrm.DLRM", "dense_features": ["I1"],
    ...        "sparse_features": ["C1"], "d": 4, "k": 16, "tables": {}, "predict_modules": {}}
    >>> serving_md(man).splitlines()[0]
    '# Serving an `mlet export` of a `dlrm` model'
"""

from __future__ import annotations

from typing import Any

PACKAGE_SNIPPET = """```python
import json, torch
import torchrec  # registers FBGEMM's INT8 embedding kernels with TorchScript

EXPORT = "path/to/export"  # the directory `mlet export` wrote
manifest = json.load(open(f"{EXPORT}/manifest.json"))
model = torch.jit.load(f"{EXPORT}/{FILE}")
# a batch of 2 rows: dense features (2, #dense) float32, one id per sparse feature and row
keys = manifest["sparse_features"]
batch = {
    "float_features": torch.zeros(2, len(manifest["dense_features"])),
    "id_list_features.lengths": torch.ones(2 * len(keys), dtype=torch.int64),
    "id_list_features.values": torch.zeros(2 * len(keys), dtype=torch.int64),  # feature-major
}
probs = model(batch)["default"]  # (2,) click probabilities; ["logits"]: the logits
```
"""

TABLES_SNIPPET = """```python
import json, torch, torch.distributed.checkpoint as dcp
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType

COLLAPSED = "path/to/collapsed"  # the directory `mlet collapse` wrote
m = json.load(open(f"{COLLAPSED}/manifest.json"))
configs = {}  # the state-dict prefix of each EmbeddingBagCollection -> its tables
for name, t in {**m["tables"], **m.get("extra_tables", {})}.items():
    prefix = t["key"].rsplit("embedding_bags.", 1)[0]
    configs.setdefault(prefix, []).append(EmbeddingBagConfig(
        name=name, embedding_dim=t["d"], num_embeddings=t["rows"], feature_names=t["features"],
        pooling=PoolingType[t["pooling"].upper()]))
ebcs = {prefix: EmbeddingBagCollection(tables=tables) for prefix, tables in configs.items()}
state = {prefix + k: v for prefix, ebc in ebcs.items() for k, v in ebc.state_dict().items()}
dcp.load(state, checkpoint_id=COLLAPSED)  # in a job: on every rank, with its own (DMP-sharded) tables
ebc = ebcs[m["state_dict"]["embedding_bag_collection"]]  # the d-dim tables
```
"""

DLRM_SNIPPET = """```python
from torchrec.models.dlrm import DLRM

dlrm = DLRM(ebc, **m["architecture"])  # ebc, m, COLLAPSED from the block above
prefix = m["state_dict"]["model_prefix"]
state = {prefix + k: v for k, v in dlrm.state_dict().items()}
dcp.load(state, checkpoint_id=COLLAPSED)
dlrm.eval()  # torch.sigmoid(dlrm(dense, KeyedJaggedTensor)).squeeze(-1): the click probabilities
```
"""


def _files(man: dict[str, Any]) -> list[str]:
    lines = []
    for entry in man.get("predict_modules", {}).values():
        what = f"{entry['precision'].upper()}"
        if "sharding" in entry:
            what += f", tables sharded table-wise over {entry['sharding']['shards']} devices by `shard_quant_model`"
        elif entry["precision"] == "int8":
            what += " (TorchRec's `quantize_inference_model`: row-wise INT8 tables)"
        lines.append(f"- `{entry['file']}`: {what}")
    if not lines:
        lines.append("- (none: this export holds per-table files only)")
    return lines


SERVE_SECTION = """## Raw rows over HTTP: `mlet serve`

```bash
mlet serve --input path/to/export --port 8080   # --precision fp32: the FP32 module; --host 0.0.0.0 in a container
curl -s localhost:8080/v1/predict -H 'Content-Type: application/json' -d '{"rows": [{"COLUMN": "raw value"}]}'
# {"probabilities":[0.0312]}; a missing column is an empty field; GET /healthz: 200 once the model is loaded
```

The rows are encoded with this export's feature transform (`transform/`, the one `mlet convert` wrote; its
`transform.json` lists the raw columns) and scored by the module above. Requests that arrive while the model runs
share its next call; a bad request gets a 4xx with one line of JSON (`{"error": ...}`).
"""


def _whole_model(man: dict[str, Any]) -> list[str]:
    name, net = man["model"], man.get("net_class", "?")
    if name == "dlrm":
        return [
            f"The whole model is TorchRec's `{net}`, built from the manifest's `architecture`, its keys under",
            '`m["state_dict"]["model_prefix"]`:',
            "",
            DLRM_SNIPPET,
        ]
    lines = [
        f"The whole `{name}` model is this project's `{net}` (configured by the manifest's `model_config`), so",
        "stock TorchRec holds its tables but not its dense part: outside this project, serve the TorchScript",
        "modules above, which hold the whole model.",
    ]
    if man.get("extra_tables"):
        lines += [
            "",
            f"`{name}` has a first-order (linear) term: its `lin_*` tables (dim "
            f"{next(iter(man['extra_tables'].values()))['d']}, one per sparse feature, `extra_tables` in the",
            "manifest) live in a second EmbeddingBagCollection, which the block above builds too (`ebcs`).",
        ]
    return lines


def serving_md(man: dict[str, Any]) -> str:
    """The ``SERVING.md`` of an export with manifest ``man``."""
    modules = man.get("predict_modules", {})
    first = modules.get("int8") or modules.get("fp32") or {"file": "predict_fp32.pt"}
    lines = [
        f"# Serving an `mlet export` of a `{man['model']}` model",
        "",
        f"{len(man['dense_features'])} dense and {len(man['sparse_features'])} sparse features, "
        f"d = {man['d']}" + (f", trained with MLET (k = {man['k']}) and collapsed" if man.get("k") else "") + ".",
        "",
        "## TorchRec's inference modules (TorchScript, TorchRec's dict signature)",
        "",
        *_files(man),
        "",
        "Each is called as TorchRec's predictor calls a model: one `Dict[str, Tensor]` with `float_features`",
        "(float32, (B, #dense)), `id_list_features.lengths` and `id_list_features.values` (int64, the sparse",
        "features in the manifest's `sparse_features` order, feature-major: all rows of the first feature, then",
        'the second...; bags of several ids are pooled as the manifest\'s `pooling` says) → `{"default":',
        'probabilities (B,), "logits": (B,)}`. The file holds the batching metadata of TorchRec\'s',
        "`PredictFactory` (`batching_metadata.json`: `float_features` dense, `id_list_features` sparse) and",
        "its result type (`result_metadata`: `dict_of_tensor`) as TorchScript extra files. A process needs",
        "only `torch` and `torchrec`:",
        "",
        PACKAGE_SNIPPET.replace("{FILE}", first["file"]),
        *([SERVE_SECTION] if man.get("transform_identity") else []),
        "## The collapsed FP32 tables with stock TorchRec (any world size: DCP reshards)",
        "",
        TABLES_SNIPPET,
        *_whole_model(man),
        "",
        "`tables.safetensors` / `tables/<table>.npy` (from `--format`) hold the same tables as float32 (n, d) arrays.",
        "",
    ]
    return "\n".join(lines)
