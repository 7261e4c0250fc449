import json

import pytest
import torch

from refseg.config import Config, ConfigError, config_from_dict, load_config, parse_override, shipped_path
from refseg.train.engine import build_deepspeed_config, lr_lambda


def test_defaults_and_yaml_round_trip(tmp_path):
    cfg = Config()
    assert cfg.model.fusion.num_layers == 3 and cfg.model.decoder.channels == [128, 64, 32, 16]
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()


def test_retired_keys_of_older_saved_configs_are_ignored():
    """Older refseg versions wrote eval.threshold / workers / at_train_res and train.fail_at_step into
    every saved config: those checkpoints still load, and the keys are gone from the resolved config."""
    old = {"eval": {"batch_size": 8, "threshold": 0.5, "workers": 1, "at_train_res": False},
           "train": {"fail_at_step": None, "lr": 0.5}}
    cfg = config_from_dict(old)
    assert cfg.to_dict()["eval"] == {"batch_size": 8}
    assert "fail_at_step" not in cfg.to_dict()["train"] and cfg.train.lr == 0.5
    assert old["eval"]["threshold"] == 0.5  # the caller's dict is left as it was
    with pytest.raises(ConfigError, match=r"unknown config key 'eval.treshold'.*'batch_size'"):
        config_from_dict({"eval": {"treshold": 0.5}})


def test_shipped_path_finds_shipped_files_and_names_the_folder(tmp_path):
    assert shipped_path("configs", "debug", "config").endswith("configs/debug.yaml")
    assert shipped_path("tune", "fusion_lr", "search space").endswith("tune/fusion_lr.yaml")
    mine = tmp_path / "mine.yml"
    assert shipped_path("configs", str(mine), "config") == str(mine)  # a YAML path is taken as given
    with pytest.raises(ConfigError, match=r"^config 'nope' is neither a file nor a config shipped in configs/; "
                                         r"pass a YAML path$"):
        shipped_path("configs", "nope", "config")


def test_overrides_typed():
    cfg = load_config(None, ["train.lr=2e-4", "model.fusion.num_layers=4", "data.augment=true",
                             "model.decoder.channels=[64,32,16,8]", "train.max_steps_per_epoch=null"])
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.fusion.num_layers == 4
    assert cfg.data.augment is True
    assert cfg.model.decoder.channels == [64, 32, 16, 8]
    assert cfg.train.max_steps_per_epoch is None
    # an int where a float is expected is accepted and converted
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*did you mean 'lr'"):
        load_config(None, ["train.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"'model.fusion.num_layer'.*'num_layers'"):
        config_from_dict({"model": {"fusion": {"num_layer": 2}}})
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*'train'"):
        config_from_dict({"trian": {}})


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"'model.fusion.num_layers' expects an integer"):
        load_config(None, ["model.fusion.num_layers=two"])
    with pytest.raises(ConfigError, match=r"'data.augment' expects true/false"):
        load_config(None, ["data.augment=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.lr")
    # optional keys (float | None) name the key too -- this once raised "exceptions must derive from BaseException"
    with pytest.raises(ConfigError, match=r"'train.time_budget_s' expects a number, got 'soon'"):
        load_config(None, ["train.time_budget_s=soon"])
    assert load_config(None, ["train.time_budget_s=null"]).train.time_budget_s is None


def test_missing_config_file_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_preset_seeds_model_section_then_overrides_apply():
    cfg = config_from_dict({"model": {"preset": "tiny", "fusion": {"num_layers": 1}}})
    assert cfg.model.preset == "tiny"
    assert cfg.model.text.bert_config is not None  # from the tiny preset
    assert cfg.model.fusion.num_layers == 1  # the override wins


def test_shipped_configs_load():
    for name in ("debug", "refcoco_r101", "refcoco_r50"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.model.preset in ("tiny", "r101", "r50")
    assert load_config("configs/refcoco_r101.yaml").train.lr == pytest.approx(1e-4)


def test_deepspeed_config(tmp_path):
    cfg = load_config(None, ["train.precision=bf16", "deepspeed.zero_stage=3", "train.grad_accum=2"])
    ds = build_deepspeed_config(cfg.train, cfg.deepspeed, cuda=False)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == cfg.train.grad_clip
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        build_deepspeed_config(load_config(None, ["train.precision=fp16"]).train, cfg.deepspeed, cuda=False)
    assert build_deepspeed_config(load_config(None, ["train.precision=fp16"]).train, cfg.deepspeed,
                                  cuda=True)["fp16"]["loss_scale"] == 0
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 123}}))
    cfg.deepspeed.config_file = str(f)
    merged = build_deepspeed_config(cfg.train, cfg.deepspeed, cuda=False)
    assert merged["zero_optimization"]["reduce_bucket_size"] == 123
    cfg.deepspeed.zero_stage = 2
    with pytest.raises(ConfigError, match="sets ZeRO stage 3"):
        build_deepspeed_config(cfg.train, cfg.deepspeed, cuda=False)


def test_lr_schedule_end_moves_and_a_checkpoint_keeps_it(tmp_path):
    """train.time_budget_s re-aims the schedule mid-run: LambdaLR's state (what DeepSpeed checkpoints) must
    carry the new last step, as plain data."""
    from refseg.train.budget import set_schedule_total

    def scheduler(total: int):
        opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, 2, 0.9))

    a = scheduler(100)
    for _ in range(10):
        a.optimizer.step()
        a.step()
    set_schedule_total(a, 20)
    assert a.get_last_lr()[0] == pytest.approx((1 - 8 / 98) ** 0.9)  # the current step keeps its LR
    assert a.lr_lambdas[0](11) == pytest.approx((1 - 9 / 18) ** 0.9) and a.lr_lambdas[0](20) == 0.0
    torch.save(a.state_dict(), tmp_path / "sched.pt")
    b = scheduler(100)
    b.load_state_dict(torch.load(tmp_path / "sched.pt", weights_only=True))
    assert b.last_epoch == 10 and b.lr_lambdas[0].total_steps == 20
    b.optimizer.step()
    b.step()
    assert b.get_last_lr()[0] == pytest.approx((1 - 9 / 18) ** 0.9)


def test_lr_schedule_warmup_then_poly():
    f = lr_lambda(total_steps=100, warmup_steps=10, power=0.9)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx((1 - 45 / 90) ** 0.9)
    assert f(100) == 0.0
    assert all(f(i) >= f(i + 1) for i in range(10, 100))
