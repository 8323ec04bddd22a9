"""The run config schema: files, dotted overrides and the errors users see."""

from pathlib import Path

import pytest

from mlet_torchrec.config import ConfigError, ExperimentConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_papers_dlrm_setup():
    cfg = load_config(None)
    assert cfg.model.bottom_mlp == [512, 256, 128] and cfg.model.top_mlp == [512, 256]
    assert cfg.sparse_optimizer.name == "sgd" and cfg.sparse_optimizer.lr == 0.2
    assert cfg.train.batch_size == 128 and cfg.embedding.k is None and cfg.embedding.sigma == 0.25


# every run config, subfolders included (configs/models/...); configs/synth/ holds generator settings
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] != "synth")


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_validate(path):
    assert isinstance(load_config(path), ExperimentConfig)


def test_overrides_are_typed_yaml_values():
    cfg = load_config(
        CONFIGS / "demo.yaml",
        [
            "embedding.k=null",
            "model.top_mlp=[8, 4]",
            "train.seed=3",
            "embedding.tables.C1.k=128",
            "embedding.tables.C1.sharding=row_wise",
        ],
    )
    assert cfg.embedding.k is None and cfg.model.top_mlp == [8, 4] and cfg.train.seed == 3
    assert cfg.embedding.k_for("C1") == 128 and cfg.embedding.sharding_for("C1") == "row_wise"
    assert cfg.embedding.k_for("C2") is None and cfg.embedding.sharding_for("C2") == "auto"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", ["embedding.d=8"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("embedding.dd=3", r"embedding.dd: unknown key"),
        ("sparse_optimizer.name=adam", r"sparse_optimizer.name: Input should be 'sgd', 'adagrad' or 'rowwise_adagrad'"),
        ("embedding.sharding=diagonal", r"embedding.sharding: Input should be 'auto', 'table_wise'"),
        ("train.batch_size=0", r"train.batch_size: Input should be greater than 0"),
        ("train.batch_size=many", r"train.batch_size: Input should be a valid integer"),
        ("nonsense", r"override 'nonsense' is not of the form key.sub=value"),
        ("run.dir.x=1", r"run.dir is a value, not a section"),
        ("embedding.d=true", r"embedding.d: .*a boolean is not a value of this key \(got True\)"),  # was d = 1
        ("embedding.k=yes", r"embedding.k: .*a boolean is not a value of this key"),
        ("model.bottom_mlp=no", r"model.bottom_mlp: .*a boolean is not a value of this key"),
        ("data.path=", r"data.path: String should have at least 1 character"),  # was: "metadata.json: no ..."
        ("run.dir=", r"run.dir: String should have at least 1 character"),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "demo.yaml", [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("data: {path: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "twice.yaml").write_text("model: {name: dlrm}\nembedding: {d: 4, k: 8}\nmodel: {name: fm}\n")
    with pytest.raises(ConfigError, match="twice.yaml is not valid YAML: key 'model' given twice .* line 3"):
        load_config(tmp_path / "twice.yaml")  # YAML alone keeps the last `model:` without a word
    (tmp_path / "merged.yaml").write_text("embedding:\n  <<: {d: 4, k: 4}\n  k: 8\n  shuffle_ids: null\n")
    with pytest.raises(ConfigError, match="embedding.shuffle_ids: unknown key"):  # a merge key may be overridden
        load_config(tmp_path / "merged.yaml")
    (tmp_path / "merged.yaml").write_text("embedding:\n  <<: {d: 4, k: 4}\n  k: 8\n")
    assert (load_config(tmp_path / "merged.yaml").embedding.d, load_config(tmp_path / "merged.yaml").embedding.k) == (
        4,
        8,
    )


def test_every_config_error_is_one_line_and_a_user_error(tmp_path):
    from mlet_torchrec.errors import UserError

    (tmp_path / "two.yaml").write_text("embedding: {d: 0, dd: 1}\ntrain: {batch_size: x}\n")
    (tmp_path / "broken.yaml").write_text("data: {path: [\n  x\n")
    for path in ("two.yaml", "broken.yaml"):
        with pytest.raises(UserError) as err:
            load_config(tmp_path / path)
        assert "\n" not in str(err.value) and str(tmp_path / path) in str(err.value)
    assert "embedding.d: Input should be greater than 0 (got 0); embedding.dd: unknown key" in _message(
        tmp_path / "two.yaml"
    )


def _message(path) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return str(err.value)


def test_packaged_configs_by_name(tmp_path, monkeypatch):
    from mlet_torchrec.config import packaged_config_names

    names = packaged_config_names()
    assert {"tiny", "demo", "models/deepfm", "synth/demo"} <= set(names)
    assert len(names) == len(list(CONFIGS.rglob("*.yaml")))
    monkeypatch.chdir(tmp_path)  # no configs/ here: the names resolve to the package's copies
    assert load_config("tiny") == load_config(CONFIGS / "tiny.yaml")
    assert load_config("models/deepfm.yaml").model.name == "deepfm"
    with pytest.raises(
        ConfigError, match=r"config file nope does not exist and is not a packaged config name \(.*tiny"
    ):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("../configs/tiny")  # names stay inside the package
    # a file of that name wins over the packaged config
    (tmp_path / "tiny").write_text("train: {batch_size: 7}\n")
    assert load_config("tiny").train.batch_size == 7
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        load_config("adir")


TORCH_FREE = """
import contextlib, io, sys
from mlet_torchrec.cli.main import main
from mlet_torchrec.config import load_config, packaged_config_names
for name in packaged_config_names():
    if not name.startswith("synth/"):
        load_config(name)
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
    main(["--help"])
assert "usage: mlet" in out.getvalue()
import os
os.environ.update(RANK="1", WORLD_SIZE="2")  # a rank of a convert job asks where it is
from mlet_torchrec.cli.convert import _ranks
assert _ranks() == {"rank": 1, "world_size": 2}
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchrec", "fbgemm_gpu")))
"""


def test_loading_configs_and_help_import_no_torch():
    """Every model's config class is torch-free: validating every packaged config, ``mlet --help`` and a convert
    rank's question "which rank am I" import no torch (a second or more per command, per rank)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_key_of_another_model_is_an_error_naming_the_key_and_the_model(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {name: deepfm, dnn_hidden_units: [8], bottom_mlp: [4]}\n")
    with pytest.raises(ConfigError, match=r"model.bottom_mlp: unknown key of model deepfm \(its keys: name, dnn_hid"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"model.name: Input should be one of 'autoint', .* \(got 'nosuch'\)"):
        load_config(None, ["model.name=nosuch"])


def test_switching_the_model_keeps_the_keys_it_shares():
    """``model.name=X`` over a file of another model (a sweep's grid axis) keeps the keys X has, drops the rest;
    the same key in an override is the user's and an error."""
    dcn = load_config(CONFIGS / "experiments/families/movielens_deepctr.yaml", ["model.name=dcn"]).model
    assert dcn.model_dump() == {**load_config(None, ["model.name=dcn"]).model.model_dump(), "dnn_hidden_units": None}
    deepfm = load_config(CONFIGS / "tiny.yaml", ["model.name=deepfm", "model.dnn_hidden_units=[4]"]).model
    assert deepfm.model_dump() == {"name": "deepfm", "dnn_hidden_units": [4], "dnn_dropout": 0.0}
    assert load_config(CONFIGS / "tiny.yaml", ["model.name=dlrm_dcn"]).model.bottom_mlp == [16]
    with pytest.raises(ConfigError, match="model.top_mlp: unknown key of model deepfm"):
        load_config(CONFIGS / "tiny.yaml", ["model.name=deepfm", "model.top_mlp=[4]"])
