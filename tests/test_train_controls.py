"""Training controls on real (1-process gloo) runs: lr warmup/decay on both optimizers, dense gradient
clipping, bf16 autocast refused on CPU, asynchronous checkpoints visible only when complete, and a NaN
loss stopping the run before any checkpoint although the loss is read only every ``log_every`` steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from mlet_torchrec.config import ConfigError, load_config
from mlet_torchrec.training.checkpoint import complete_checkpoints, load_model_state
from mlet_torchrec.training.guardrails import TrainingDiverged
from mlet_torchrec.training.optim import ScheduledOptimizer, lr_factor
from mlet_torchrec.training.train import train

REPO = Path(__file__).resolve().parents[1]


def _config(data: Path, run_dir: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={data}",
            f"run.dir={run_dir}",
            "train.max_steps=12",
            "train.log_every=4",
            "sparse_optimizer.lr=0.2",
            "dense_optimizer.lr=0.1",
            *extra,
        ],
    )


def _fbgemm_lrs(model: nn.Module) -> list[float]:
    """The learning rates FBGEMM's fused W1 kernels hold (what their update in the backward uses)."""
    found: list[float] = []

    def walk(opt: Any) -> None:
        if hasattr(opt, "_emb_module"):
            found.append(opt._emb_module.get_learning_rate())
        for _, sub in getattr(opt, "optimizers", []):
            walk(sub)

    walk(model.fused_optimizer)
    return found


def test_lr_factor_warms_up_then_decays():
    assert [lr_factor(s, 4, "none", 10, 0.0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, 0, "cosine", 10, 0.1) for s in range(11)]
    assert cos[0] == pytest.approx(1.0) and cos[10] == pytest.approx(0.1) and cos == sorted(cos, reverse=True)
    assert lr_factor(9, 2, "linear", 10, 0.0) == pytest.approx(1 / 8)


def test_warmup_and_decay_drive_the_fused_and_the_dense_learning_rate(synth_dataset, tmp_path):
    seen: dict[int, dict[str, Any]] = {}

    def hook(ev) -> None:  # type: ignore[no-untyped-def]
        seen[ev.step] = {"fbgemm": _fbgemm_lrs(ev.model)}  # what FBGEMM's fused update used at this step

    cfg = _config(
        synth_dataset(), tmp_path / "run", "train.warmup_steps=4", "train.lr_decay=linear", "train.min_lr_ratio=0.5"
    )
    train(cfg, hooks=[hook])
    for step, got in seen.items():
        f = lr_factor(step - 1, 4, "linear", 12, 0.5)
        assert got["fbgemm"] and all(lr == pytest.approx(0.2 * f, rel=1e-6) for lr in got["fbgemm"]), step
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert train_records
    for r in train_records:  # the lr logged at step s is the one set for step s (0-based s - 1)
        f = lr_factor(r["step"] - 1, 4, "linear", 12, 0.5)
        assert r["dense_lr"] == pytest.approx(0.1 * f) and r["sparse_lr"] == pytest.approx(0.2 * f)


def test_dense_gradient_clipping_bounds_the_global_norm():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(4))
    dense = KeyedOptimizerWrapper({"a": a, "b": b}, lambda ps: torch.optim.SGD(list(ps), lr=1.0))
    opt = ScheduledOptimizer(
        CombinedOptimizer([("dense", dense)]), load_config(None, ["train.grad_clip_norm=0.5"]).train, total_steps=10
    )
    before = a.detach().clone(), b.detach().clone()
    opt.zero_grad()
    (a.sum() * 100 + b.sum() * 100).backward()
    opt.step()
    moved = torch.cat([(before[0] - a.detach()).reshape(-1), before[1] - b.detach()])
    assert float(moved.norm()) == pytest.approx(0.5, rel=1e-4)  # lr 1: the update is the clipped gradient


def test_bf16_autocast_is_refused_on_cpu(synth_dataset, tmp_path):
    with pytest.raises(ConfigError, match="train.bf16_autocast=true needs CUDA"):
        train(_config(synth_dataset(), tmp_path / "run", "train.bf16_autocast=true", "run.device=cpu"))


def test_async_checkpoint_is_visible_only_once_complete_and_holds_its_steps_weights(synth_dataset, tmp_path):
    run_dir = tmp_path / "run"
    visible: dict[int, list[str]] = {}
    weights: dict[int, dict[str, torch.Tensor]] = {}

    def hook(ev) -> None:  # type: ignore[no-untyped-def]
        visible[ev.step] = [p.name for p in complete_checkpoints(run_dir / "checkpoints")]
        if ev.step == 4:
            weights[4] = {
                k: v.detach().clone()
                for k, v in ev.model.state_dict().items()
                if isinstance(v, torch.Tensor) and "over_arch" in k
            }

    train(
        _config(
            synth_dataset(),
            run_dir,
            "train.checkpoint_every=4",
            "train.async_checkpoint=true",
            "train.keep_checkpoints=5",
        ),
        hooks=[hook],
    )
    assert "step_00000004" not in visible[4] and "step_00000004" not in visible[7]  # written in the background
    assert "step_00000004" in visible[8]  # committed when the next one started, after its write completed
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == [
        "step_00000004",
        "step_00000008",
        "step_00000012",
    ]
    # the background write holds step 4's weights although training went on changing them
    from data_pipes.schema import DatasetMeta
    from mlet_torchrec.models.registry import build_model

    cfg = load_config(run_dir / "config.yaml")
    plain = build_model(cfg.model, cfg.embedding, DatasetMeta.load(cfg.data.path))
    load_model_state(run_dir / "checkpoints" / "step_00000004", plain)
    got = plain.state_dict()
    assert weights[4] and all(torch.equal(got[k], v) for k, v in weights[4].items())


@pytest.mark.parametrize("background", [False, True])
def test_nan_loss_stops_before_a_checkpoint_although_read_every_log_every_steps(synth_dataset, tmp_path, background):
    """With ``background`` the step-4 checkpoint is still being written when the NaN appears: it was taken
    from finite weights, so it is committed (not dropped) before the run stops."""
    run_dir = tmp_path / "run"

    def hook(ev) -> None:  # type: ignore[no-untyped-def]
        if ev.step == 5:  # step 6's loss is NaN; it is read at the step-8 checkpoint, not at step 6
            with torch.no_grad():
                for name, p in ev.model.named_parameters():
                    if "over_arch" in name and p.dim() == 2:
                        p.fill_(float("nan"))
                        break

    with pytest.raises(TrainingDiverged, match="training loss became nan at step 6") as err:
        train(
            _config(
                synth_dataset(),
                run_dir,
                "train.checkpoint_every=4",
                "train.log_every=100",
                f"train.async_checkpoint={str(background).lower()}",
            ),
            hooks=[hook],
        )
    assert "step_00000004, is intact" in str(err.value)
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["step_00000004"]
