"""Artifact folders (config.json + model.safetensors, the Hugging Face hub layout) and fine-tuning
(``train.init_from``): exported folders predict exactly what their model.pt predicts, carry a tokenizer
that is not built in, are accepted wherever a checkpoint is; a run started from trained weights starts
with a lower loss; a non-strict load names every mismatched key on one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predictor import IMAGE_SIZE, tiny_checkpoint
from test_train import REPO, history, small_cfg

from refseg.config import ConfigError, config_from_dict

TEXTS = ["the red circle on the left", "a small blue square", "biggest shape"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def artifact(ckpt, tmp_path_factory) -> Path:
    """``refseg export --format safetensors`` of the tiny model.pt, through the CLI."""
    from refseg.cli import main

    out = tmp_path_factory.mktemp("export") / "artifact"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    return out


def images(n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (40 + 9 * i, 70 - 7 * i, 3), dtype=np.uint8) for i in range(n)]


def assert_same_predictions(a, b) -> None:
    for pa, pb in zip(a.predict_batch(images(), TEXTS), b.predict_batch(images(), TEXTS)):
        np.testing.assert_array_equal(pa.prob, pb.prob)
        np.testing.assert_array_equal(pa.mask, pb.mask)


def test_export_then_from_pretrained_gives_identical_probabilities(ckpt, artifact):
    from safetensors.torch import load_file

    from refseg.infer import Predictor
    from refseg.models import load_model

    assert sorted(p.name for p in artifact.iterdir()) == ["config.json", "model.safetensors"]  # tiny: built-in vocab
    meta = json.loads((artifact / "config.json").read_text())
    payload = torch.load(ckpt, weights_only=True)
    assert meta["format"] == "refseg" and meta["refseg_version"] == payload["refseg_version"]
    assert meta["config"] == payload["config"] and meta["model_config"] == payload["model_config"]
    assert meta["training"] is None  # a bare model.pt: no run summary next to it
    weights = load_file(artifact / "model.safetensors")
    assert weights.keys() == payload["state_dict"].keys()
    assert all(torch.equal(weights[k], v) for k, v in payload["state_dict"].items())
    model, config = load_model(artifact)  # the model builder loads the folder too
    assert config == payload["config"] and model.config.preset == "tiny"
    assert_same_predictions(Predictor.from_pretrained(artifact), Predictor.from_checkpoint(ckpt))


def test_artifact_carries_a_tokenizer_that_is_not_built_in(tmp_path):
    """A WordPiece vocab file as model.text.tokenizer: its files travel in the folder, which then loads
    and tokenizes the same with the original file gone."""
    from refseg.infer import Predictor
    from refseg.models import build_model
    from refseg.models.export import export_artifact, save_model
    from refseg.models.text import tiny_vocab_path

    vocab = tmp_path / "vocab" / "words.txt"
    vocab.parent.mkdir()
    shutil.copy(tiny_vocab_path(), vocab)
    cfg = config_from_dict({"model": {"preset": "tiny", "text": {"tokenizer": str(vocab)}},
                            "data": {"image_size": IMAGE_SIZE}})
    torch.manual_seed(0)
    pt = save_model(tmp_path / "model.pt", build_model(cfg.model, pretrained=False), cfg.to_dict())
    before = Predictor.from_checkpoint(pt)
    out = export_artifact(pt, tmp_path / "artifact")
    assert {"tokenizer_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    shutil.rmtree(vocab.parent)
    after = Predictor.from_pretrained(out)
    assert after.config.model.text.tokenizer == str(out.resolve())
    assert [after.tokenizer(t)["input_ids"] for t in TEXTS] == [before.tokenizer(t)["input_ids"] for t in TEXTS]
    assert_same_predictions(after, before)


def test_export_cli_formats_and_bad_outputs(ckpt, artifact, tmp_path, capsys):
    from refseg.cli import main
    from refseg.infer.preflight import ARTIFACT_FILES, check_checkpoint
    from refseg.models.artifact import CONFIG_FILE, FORMAT, WEIGHTS_FILE

    assert ARTIFACT_FILES == (CONFIG_FILE, WEIGHTS_FILE) and FORMAT == "refseg"  # preflight's copy of the names
    check_checkpoint(artifact)  # the cheap check before Ray accepts the folder
    # an artifact folder exports again (replaced in place), from an artifact folder too
    assert main(["export", "--checkpoint", str(artifact), "--out", str(tmp_path / "again")]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "again")]) == 0
    assert main(["export", "--format", "onnx", "--no-verify", "--checkpoint", str(artifact),
                 "--out", str(tmp_path / "onnx")]) == 0
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["model.onnx", "model.onnx.json"]
    capsys.readouterr()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "busy")]) == 2
    assert capsys.readouterr().err == (f"refseg: error: --out {tmp_path / 'busy'} holds other files; pass a new or "
                                       "empty directory (or an artifact folder to replace)\n")
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 12)
    with pytest.raises(ConfigError) as e:
        check_checkpoint(broken)
    assert str(e.value) == (f"artifact folder '{broken}': model.safetensors could not be read (ValueError); "
                            "export the model again")


def test_segment_accepts_an_artifact_folder(ray_session, ckpt, artifact, tmp_path):
    """A folder's files travel to the Ray Data actors (infer.batch, shared by segment and evaluate): the
    masks equal the model.pt Predictor's."""
    from PIL import Image

    from refseg.cli import main
    from refseg.infer import Predictor

    rows = []
    for i, (img, text) in enumerate(zip(images(), TEXTS)):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"id": f"r{i}", "image": f"{i}.png", "text": text}) + "\n")
    (tmp_path / "rows.jsonl").write_text("".join(rows))
    assert main(["segment", "--checkpoint", str(artifact), "--input", str(tmp_path / "rows.jsonl"),
                 "--workers", "1", "--output", str(tmp_path / "out")]) == 0
    reference = Predictor.from_checkpoint(ckpt).predict_batch(images(), TEXTS)
    for i, pred in enumerate(reference):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "masks" / f"r{i}.png")) > 0, pred.mask)


# ----------------------------------------------------------------------------- fine-tuning
def mismatched_cfg(ckpt: Path, strict: bool):
    """The tiny model with a no-target head (missing keys), one fusion layer (unexpected keys) and a wider
    LSTM (shape-mismatched keys), initialised from the classic tiny model.pt."""
    return config_from_dict({"model": {"preset": "tiny", "no_target_head": True, "fusion": {"num_layers": 1},
                                       "text": {"lstm_hidden": 48}},
                             "train": {"init_from": str(ckpt), "init_strict": strict}})


def test_non_strict_load_reports_the_mismatched_keys(ckpt):
    from refseg.models import build_model
    from refseg.train.init import check_init, compare, init_weights

    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    cfg = mismatched_cfg(ckpt, strict=False)
    model = build_model(cfg.model, pretrained=False)
    built = {k: v.clone() for k, v in model.state_dict().items()}
    missing, unexpected, mismatched = compare(built, saved)
    assert missing and unexpected and mismatched
    assert all(k.startswith("no_target.") for k in missing) and all(k.startswith("fusion.") for k in unexpected)
    assert all(k.startswith("text.") for k in mismatched)
    line = check_init(cfg)
    assert "\n" not in line and line.startswith(f"train.init_from '{ckpt}': loaded "
                                                f"{len(built) - len(missing) - len(mismatched)} of {len(built)} tensors;")
    assert f"missing {len(missing)}: {missing[0]}" in line and f"unexpected {len(unexpected)}: {unexpected[0]}" in line
    k = mismatched[0]
    assert f"shape-mismatched {len(mismatched)}: {k} {tuple(saved[k].shape)}->{tuple(built[k].shape)}" in line
    init_weights(model, ckpt, strict=False)
    for key, value in model.state_dict().items():
        if key in missing or key in mismatched:
            assert torch.equal(value, built[key]), key  # left as built
        else:
            assert torch.equal(value, saved[key]), key  # loaded
    with pytest.raises(ConfigError) as e:
        check_init(mismatched_cfg(ckpt, strict=True))
    assert str(e.value) == f"{line}; set train.init_strict=false to load only the tensors that fit"


def test_training_prints_the_report_line_before_ray(ckpt, tmp_path, capsys):
    from refseg.cli import main
    from refseg.models import build_model

    args = ["train", "--config", str(REPO / "configs" / "debug.yaml"), "--output-dir", str(tmp_path / "run"),
            "model.no_target_head=true", f"train.init_from={ckpt}", "data.synthetic=false",
            f"data.root={tmp_path / 'nowhere'}"]
    assert main([*args, "train.init_strict=false"]) == 2  # stops at the missing data root, after the check
    out, err = capsys.readouterr()
    assert out.startswith(f"[refseg] train.init_from '{ckpt}': loaded ") and out.count("\n") == 1
    head_cfg = config_from_dict({"model": {"preset": "tiny", "no_target_head": True}}).model
    with torch.device("meta"):
        head = [k for k in build_model(head_cfg, pretrained=False).state_dict() if k.startswith("no_target.")]
    assert f"missing {len(head)}: no_target." in out and err.startswith("refseg: error: data root")
    assert main(args) == 2  # strict (the default): the same line as the error, before anything else
    err = capsys.readouterr().err
    assert err.startswith(f"refseg: error: train.init_from '{ckpt}': loaded ") and err.count("\n") == 1
    assert err.endswith("set train.init_strict=false to load only the tensors that fit\n")
    assert not (tmp_path / "run").exists()


def test_bad_init_from_is_one_sentence(tmp_path):
    from refseg.config.validate import validate
    from refseg.train.init import read_init_weights

    with pytest.raises(ConfigError) as e:
        read_init_weights(tmp_path / "nope.pt")
    assert str(e.value) == (f"train.init_from '{tmp_path / 'nope.pt'}' does not exist; pass the weights of a "
                            "trained run (its model.pt or artifact/ folder)")
    with pytest.raises(ConfigError) as e:
        validate(config_from_dict({"train": {"init_from": "s3://bucket/model.pt"}}))
    assert str(e.value) == ("train.init_from must be a local model.pt, run dir or artifact folder (or null), "
                            "got 's3://bucket/model.pt'")


@pytest.mark.slow
def test_training_writes_an_artifact_and_init_from_starts_lower(ray_session, synthetic_root, tmp_path):
    """A 4-epoch run writes artifact/ (its summary in config.json, predictions equal to model.pt's); a run
    started from that folder has a first-epoch loss below the from-scratch run's (same data), and trains
    with exactly the artifact's weights (lr 0 keeps them: its model.pt's parameters equal the folder's)."""
    from safetensors.torch import load_file

    from refseg.infer import Predictor
    from refseg.models import load_model
    from refseg.train import run_training

    fast = ["train.val_every=0", "train.checkpoint_every=1", "train.keep_checkpoints=1", "train.max_steps_per_epoch=8"]
    scratch = tmp_path / "scratch"
    summary = run_training(small_cfg(synthetic_root, "train.epochs=4", *fast), scratch)
    art = Path(summary["artifact_path"])
    assert art == scratch / "artifact" and sorted(p.name for p in art.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((art / "config.json").read_text())
    assert meta["training"] == {k: v for k, v in summary.items() if k != "artifact_path"}
    assert_same_predictions(Predictor.from_pretrained(art), Predictor.from_checkpoint(scratch / "model.pt"))

    tuned = tmp_path / "tuned"
    run_training(small_cfg(synthetic_root, "train.epochs=1", "train.lr=0", f"train.init_from={art}", *fast), tuned)
    first_scratch, first_tuned = history(scratch)[0]["loss"], history(tuned)[0]["loss"]
    print(f"first-epoch loss: from scratch {first_scratch:.4f}, from the artifact {first_tuned:.4f}")
    assert first_tuned < first_scratch
    weights, (model, _) = load_file(art / "model.safetensors"), load_model(tuned / "model.pt")
    params = dict(model.named_parameters())
    assert len(params) > 100 and all(torch.equal(p.detach(), weights[name]) for name, p in params.items())

