"""train.no_target_refit_epochs: the no-target head refitted on the final model's features.

- the fit alone (:func:`refseg.train.refit.fit_decision`) on vectors whose label it can learn: the
  held-out BCE falls, only the decision weights come back, the same seed gives the same weights;
- :func:`refseg.train.refit.set_parameters` in real DeepSpeed groups of 2 ranks on gloo
  (tests/zero_reshard_worker.py ``set``), ZeRO-0 to 3: the module's weight, DeepSpeed's fp32 master copy
  and the checkpoint's consolidated weights (what model.pt is made of) all hold the written value;
- a Ray Train run on the generalized synthetic set: the refit runs after the last epoch's steps, on
  every training sentence, and the exported model.pt scores what the run's last validation reported;
- config errors as one sentence.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_elastic import run_group
from zero_reshard_worker import SET_CASES, set_value

from refseg.config import ConfigError, config_from_dict, load_config
from refseg.config.validate import validate
from refseg.models.heads import NoTargetHead
from refseg.train.refit import fit_decision

REPO = Path(__file__).resolve().parents[1]


def pooled_vectors(n: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(token mean, token max, sentence, mask evidence, region) of a head with dim 8 and 6 region channels;
    the label is whether the region vector points the sentence's way (a rule :meth:`decide` can learn)."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g),
             torch.rand(n, 2, generator=g), torch.randn(n, 6, generator=g)]
    labels = ((parts[4][:, :3] * parts[2][:, :3]).sum(1) < 0).float()
    return parts, labels


def test_fit_learns_the_held_out_rule_and_returns_the_decision_weights_only():
    torch.manual_seed(0)
    head = NoTargetHead(8, detach=True, region_channels=6)
    parts, labels = pooled_vectors(600, seed=1)
    weights, report = fit_decision(head.args, head.state_dict(), parts, labels, epochs=40, weight_decay=0.0)
    assert report["refit_samples"] == 600 and 1 <= report["refit_epochs"] <= 40
    assert report["refit_heldout_bce"] < 0.8 * report["refit_heldout_bce_before"], report
    decision = {k for k, _ in head.named_parameters() if not k.startswith("token.")}
    assert set(weights) == decision
    # fitted weights score fresh samples of the same rule better than the head as built
    fitted = NoTargetHead(**head.args)
    fitted.load_state_dict({**head.state_dict(), **weights})
    new_parts, new_labels = pooled_vectors(400, seed=2)

    def bce(h: NoTargetHead) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.binary_cross_entropy_with_logits(h.decide(*new_parts), new_labels))

    assert bce(fitted) < 0.8 * bce(head)
    again, _ = fit_decision(head.args, head.state_dict(), parts, labels, epochs=40, weight_decay=0.0)
    assert all(torch.equal(again[k], weights[k]) for k in weights)


def test_a_fit_that_cannot_improve_keeps_the_head():
    torch.manual_seed(0)
    head = NoTargetHead(8, detach=True, region_channels=6)
    parts, _ = pooled_vectors(200, seed=3)
    noise = (torch.rand(200, generator=torch.Generator().manual_seed(4)) < 0.5).float()  # nothing to learn
    weights, report = fit_decision(head.args, head.state_dict(), parts, noise, epochs=0, weight_decay=0.0)
    assert report["refit_epochs"] == 0 and report["refit_heldout_bce"] == report["refit_heldout_bce_before"]
    assert all(torch.equal(weights[k], v) for k, v in head.state_dict().items() if k in weights)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_set_parameters_reaches_module_master_and_checkpoint_at_every_zero_stage(tmp_path):
    from refseg.train.checkpoint import CKPT_TAG
    from refseg.train.zero_reader import fp32_state_dict

    reports = run_group(2, "set", str(tmp_path))
    value = set_value()
    for stage, precision in SET_CASES:
        case = f"zero{stage}_{precision}"
        low = value.to(torch.bfloat16).float() if precision == "bf16" else value
        assert torch.equal(torch.tensor(reports[case]["module"]), low), case
        master = reports[case]["master"]
        if stage:  # ZeRO-1/2/3 keep an fp32 copy, which later steps and the consolidated export read
            assert master is not None and torch.equal(torch.tensor(master), value), case
        else:  # ZeRO-0 trains the module's own weights (DeepSpeed 0.19 keeps no fp32 copy there)
            assert master is None or torch.equal(torch.tensor(master), value), case
        saved = fp32_state_dict(tmp_path / case, CKPT_TAG)["0.weight"]
        # ZeRO-1/2/3: consolidated from the fp32 masters; ZeRO-0: the module's own weights
        assert torch.equal(saved, value if stage else low), case


def test_refit_config_errors_are_one_sentence():
    with pytest.raises(ConfigError) as e:
        validate(config_from_dict({"train": {"no_target_refit_epochs": 5}}))
    assert str(e.value) == ("train.no_target_refit_epochs refits the no-target head, and this model has none: set "
                            "model.no_target_head: true (generalized data) or train.no_target_refit_epochs: 0")
    with pytest.raises(ConfigError, match=r"^train.no_target_refit_epochs must be 0 \(off\) or more passes, got -1$"):
        validate(config_from_dict({"train": {"no_target_refit_epochs": -1}}))
    with pytest.raises(ConfigError, match=r"^train.no_target_refit_samples must be at least 10, got 3$"):
        validate(config_from_dict({"train": {"no_target_refit_samples": 3}}))
    with pytest.raises(ConfigError, match=r"needs deepspeed.zero_stage 1, 2 or 3 .*; or use bf16$"):
        validate(config_from_dict({"model": {"no_target_head": True}, "deepspeed": {"zero_stage": 0},
                                   "train": {"no_target_refit_epochs": 5, "precision": "fp16", "use_gpu": True}}))


def test_debug_grefcoco_config_refits():
    cfg = load_config(REPO / "configs" / "debug_grefcoco.yaml")
    validate(cfg)
    assert cfg.train.no_target_refit_epochs > 0 and cfg.model.no_target_head


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_ray_run_refits_the_head_and_exports_what_it_validated(ray_session, tmp_path, stage):
    from refseg.data import load_split
    from refseg.data.sources.synthetic_generalized import make_generalized_synthetic
    from refseg.infer import evaluate
    from refseg.train import run_training
    from refseg.train.checkpoint import export_checkpoint

    root = make_generalized_synthetic(tmp_path / "set", num_images=60, seed=0)
    train = load_split(root, "grefcoco", "unc", "train")
    # a head this young says about the prior for every sample: deciding at the prior splits the samples,
    # so that the comparison below is one of no-target calls, not of a head on one side of 0.5
    prior = sum(r["no_target"] for r in train) / len(train)
    cfg = load_config(REPO / "configs" / "debug_grefcoco.yaml", [
        f"data.root={root}", "data.synthetic=false", "data.image_size=64", "train.time_budget_s=null",
        "train.epochs=3", "train.batch_size=4", "train.max_steps_per_epoch=30", "train.warmup_steps=0",
        "train.val_every=1", "train.checkpoint_every=1", "train.no_target_refit_epochs=20", "eval.batch_size=16",
        f"model.no_target_threshold={prior:.4f}", f"deepspeed.zero_stage={stage}", "train.precision=fp32"])
    out = tmp_path / "run"
    summary = run_training(cfg, out)  # 2 workers; ZeRO-3: the head's weights partitioned over them
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("refit_samples" not in h for h in hist[:-1])  # after the last epoch only
    last = hist[-1]
    # every training sentence of each rank's cached rows (the ranks contribute equal counts)
    assert len(train) - 2 * 8 <= last["refit_samples"] <= len(train), (last["refit_samples"], len(train))
    assert last["refit_heldout_bce"] < last["refit_heldout_bce_before"], last
    # the last epoch's checkpoint is the model the run validated last (refitted head, the ranks' averaged
    # BatchNorm statistics): exported and evaluated on its own at the training resolution, it scores what
    # the run reported -- up to float noise (other batches, channels-last inputs in training)
    model_pt = export_checkpoint(summary["latest_checkpoint"], tmp_path / "latest.pt")
    metrics = evaluate(model_pt, root, "grefcoco", "unc", "val", at_train_res=True,
                       output=tmp_path / "eval")["at_train_res"]
    assert metrics["num_samples"] == last["val_samples"]
    for key, n in {"n_acc": metrics["num_no_target"], "t_acc": metrics["num_target"]}.items():
        assert abs(metrics[key] - last[f"val_{key}"]) * n <= 1 + 1e-9, (key, metrics[key], last[f"val_{key}"], n)
    for key in ("giou", "ciou"):
        assert metrics[key] == pytest.approx(last[f"val_{key}"], abs=5e-4), (key, metrics[key], last[f"val_{key}"])


def test_time_budget_keeps_one_epoch_for_the_refit():
    from refseg.train.budget import TimeBudget
    from refseg.train.checkpoint import RunState

    def fitted(reserve: int) -> int:
        state = RunState(epoch=4)
        budget = TimeBudget.start(840.0, 150, state, t0=0.0, reserve_epochs=reserve)
        for second in (0.0, 10.0, 20.0, 30.0, 40.0):  # 10 s per epoch; the 4th epoch ended at 40 s
            budget.record(state, second)
        return budget.fit(state)

    # 840 s less the 3 % margin = 814.8 s; 774.8 s left: 77 more epochs, one fewer with the refit's epoch kept
    assert (fitted(0), fitted(1)) == (4 + 77, 4 + 76)
