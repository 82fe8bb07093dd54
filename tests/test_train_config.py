"""TrainConfig: YAML + key.sub=value overrides, validated before any work, errors naming the field."""

from pathlib import Path

import pytest
import yaml

from hope_scale.model import ConfigError
from hope_scale.train.config import DEFAULT_CONFIG, TRAIN_CONFIG_DIR, TrainConfig, apply_overrides, load_config, read_yaml


def test_default_config_loads_and_round_trips():
    cfg = load_config()
    assert cfg.model_name == "hope-tiny" and cfg.model.arch == "hope"
    assert cfg.data.path and cfg.prepare.prepare_builtin
    assert cfg.grad_accum_steps(1) == cfg.train.global_batch_size // cfg.train.micro_batch_size
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict())) == cfg.to_dict()


WORLD = {"tiny-cpu": 1, "125m": 8, "760m": 8, "1.3b": 16}  # processes each shipped config is meant for


@pytest.mark.parametrize("path", sorted(TRAIN_CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_is_valid(path):
    size = next(k for k in WORLD if path.stem.endswith(k))
    cfg = TrainConfig.from_dict(read_yaml(path), world_size=WORLD[size])
    if size == "tiny-cpu":
        assert cfg.parallel.precision == "fp32" and cfg.prepare.prepare_builtin
        return
    # the GPU recipes: bf16, ZeRO, seq 4096, ~0.5M tokens per step, AdamW 4e-4 / wd 0.1, cosine
    assert cfg.parallel.precision == "bf16" and cfg.parallel.zero_stage >= 1
    assert cfg.train.seq_len == 4096 and cfg.tokens_per_step() == 524288
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.schedule.kind) == (4e-4, 0.1, "cosine")
    assert cfg.checkpoint.dir == f"runs/{path.stem}/checkpoints" and cfg.logging.dir == f"runs/{path.stem}/tensorboard"
    assert cfg.model_name == path.stem  # a baseline changes the model of its Hope base, nothing else
    hope = TrainConfig.from_dict(read_yaml(TRAIN_CONFIG_DIR / f"hope-{size}.yaml"), world_size=WORLD[size])
    for section in ("data", "parallel", "optimizer", "schedule", "train"):
        assert cfg.to_dict()[section] == hope.to_dict()[section], section


def test_base_inheritance(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("model: hope-tiny\ntrain: {max_steps: 5, seq_len: 64}\ndata: {path: d}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {max_steps: 9}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.train.max_steps, cfg.train.seq_len, cfg.data.path) == (9, 64, "d")
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(tmp_path / "c.yaml")


def test_overrides_apply_with_types():
    cfg = load_config(None, ["optimizer.lr=3e-4", "train.max_steps=7", "model.d_model=128", "schedule.kind=wsd",
                             "parallel.zero_stage=2", "data.shuffle=false", "logging.peak_flops=1e12",
                             "model.cms_levels=[{period: 1, hidden_mult: 2.0}]"])
    assert cfg.optimizer.lr == pytest.approx(3e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.max_steps == 7 and cfg.schedule.kind == "wsd" and cfg.parallel.zero_stage == 2
    assert cfg.model.d_model == 128 and cfg.model.n_layers == 4  # the rest of hope-tiny is kept
    assert len(cfg.model.cms_levels) == 1 and cfg.model.cms_levels[0].hidden_mult == 2.0
    assert cfg.data.shuffle is False and cfg.logging.peak_flops == 1e12
    assert cfg.model_name == "hope-tiny"


def test_inline_model_without_name():
    raw = read_yaml(DEFAULT_CONFIG)
    raw["model"] = {"arch": "transformer", "d_model": 64, "n_layers": 2, "n_heads": 2, "vocab_size": 258}
    cfg = TrainConfig.from_dict(raw)
    assert cfg.model.arch == "transformer" and cfg.model_name is None


@pytest.mark.parametrize("overrides,world,message", [
    (["optimizer.lr=abc"], None, "optimizer.lr: expected a number, got 'abc'"),
    (["optimizer.lrr=1"], None, "optimizer: unknown key(s) ['lrr']"),
    (["trian.max_steps=1"], None, "config: unknown section(s) ['trian']"),
    (["model.d_modell=3"], None, "model: unknown key(s) ['d_modell']"),
    (["model=hope-huge"], None, "model: no named config 'hope-huge'"),
    (["data.shuffle=maybe"], None, "data.shuffle: expected true/false, got 'maybe'"),
    (["data.tokenizr=byte"], None, "data: unknown key(s) ['tokenizr']"),
    (["train.max_steps=1.5"], None, "train.max_steps: expected an integer, got 1.5"),
    (["train.max_steps=0"], None, "train.max_steps: must be >= 1"),
    (["schedule.kind=linear"], None, "schedule.kind: 'linear' is not one of"),
    (["schedule.warmup_steps=-1"], None, "schedule.warmup_steps: must be >= 0"),
    (["schedule.write_cost_from_step=-1"], None, "schedule.write_cost_from_step: must be >= 0"),
    (["schedule.write_cost_ramp_steps=-1"], None, "schedule.write_cost_ramp_steps: must be >= 0"),
    (["parallel.tensor_parallel=3"], 3, "parallel.tensor_parallel: model.n_heads=4 is not divisible by tensor_parallel=3"),
    (["parallel.pipeline_parallel=3"], 3, "parallel.pipeline_parallel: model.n_layers=4 is not divisible by pipeline_parallel=3"),
    (["parallel.pipeline_parallel=2", "parallel.zero_stage=2"], 2, "parallel.zero_stage: ZeRO stage 2 cannot be combined"),
    (["parallel.tensor_parallel=2"], 3, "world size 3"),
    (["parallel.data_parallel=2"], 4, "parallel.data_parallel"),
    (["parallel.precision=fp16"], None, "parallel.precision: 'fp16' is not one of"),
    (["train.global_batch_size=12"], 2, "train.global_batch_size: 12 is not a multiple of micro_batch_size*data_parallel=16"),
    (["train.seq_len=4096"], None, "train.seq_len: 4096 exceeds model max_seq_len=1024"),
    (["model.n_heads=3"], None, "model.n_heads"),
    (["optimizer.lr"], None, "expected key.sub=value"),
    # non-finite numbers, as YAML floats or strings, anywhere in the config
    (["optimizer.lr=.inf"], None, "optimizer.lr: expected a finite number, got inf"),
    (["optimizer.lr=nan"], None, "optimizer.lr: expected a finite number, got 'nan'"),
    (["model.init_std=.nan"], None, "model.init_std: expected a finite number"),
    (["logging.peak_flops=-.inf"], None, "logging.peak_flops: expected a finite number"),
    # combinations that used to pass --print-config and fail later
    (["parallel.precision=bf16"], None, "parallel.precision: bf16 needs parallel.zero_stage >= 1"),
    (["checkpoint.resume=sometimes"], None, "checkpoint.resume: 'sometimes' is neither auto, never nor an existing"),
    (["logging.device=h100"], None, "logging.device: 'h100' is not one of"),
    (["parallel.deepspeed={zero_optimisation: {stage: 0}}"], None,
     "parallel.deepspeed.zero_optimisation: unknown DeepSpeed key"),
    (["parallel.deepspeed={zero_optimization: {reduce_bucket_sise: 5}}"], None,
     "parallel.deepspeed.zero_optimization.reduce_bucket_sise: Extra inputs are not permitted"),
    (["parallel.deepspeed={zero_optimization: {stage: 2}}"], None,
     "parallel.deepspeed.zero_optimization.stage: set by hope-scale from parallel.zero_stage"),
    (["parallel.deepspeed={gradient_clipping: 2.0}"], None,
     "parallel.deepspeed.gradient_clipping: set by hope-scale from optimizer.grad_clip"),
    (["parallel.deepspeed={pipeline: {activation_checkpoint_interval: 1}}"], None,
     "parallel.deepspeed.pipeline.activation_checkpoint_interval: set by hope-scale from train.activation_checkpointing"),
    (["train.activation_checkpointing=layer"], None, "train.activation_checkpointing: 'layer' is not one of"),
    (["data.shuffle_algo=py9"], None, "data.shuffle_algo: 'py9' is not one of"),
    (["data.num_workers=-1"], None, "data.num_workers: must be >= 0"),
    (["data.validate_hash=md5"], None, "data.validate_hash: 'md5' is not one of"),
    (["model.proj_hidden_mult=0"], None, "model.proj_hidden_mult: must be a finite number > 0, got 0"),
    (["model.mem_hidden_mult=-1"], None, "model.mem_hidden_mult: must be a finite number > 0, got -1"),
])
def test_validation_errors_name_the_field(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, world_size=world)
    assert message in str(err.value)


def test_model_override_turns_name_into_mapping():
    raw = apply_overrides({"model": "hope-tiny"}, ["model.n_layers=2"])
    assert raw["model"] == {"name": "hope-tiny", "n_layers": 2}


def test_missing_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_valid_deepspeed_overrides_pass():
    cfg = load_config(None, ["parallel.zero_stage=1", "parallel.precision=bf16",
                             "parallel.deepspeed={zero_optimization: {reduce_bucket_size: 1.0e+6}, steps_per_print: 10}"])
    assert cfg.parallel.deepspeed["zero_optimization"]["reduce_bucket_size"] == 1e6


@pytest.mark.parametrize("argv,message", [
    (["pretrain", "--print-config", "parallel.precision=bf16"], "parallel.precision: bf16 needs"),
    (["pretrain", "--print-config", "checkpoint.resume=sometimes"], "checkpoint.resume: 'sometimes'"),
    (["pretrain", "--print-config", "optimizer.lr=.inf"], "optimizer.lr: expected a finite number"),
    (["pretrain", "--resum", "x"], "unrecognized arguments: --resum"),  # not taken for --resume
    (["pretrain", "--print-conf"], "unrecognized arguments: --print-conf"),
    (["eval", "perplexity", "--checkpoint", "x", "--text", "y", "--max-tok", "5"], "unrecognized arguments: --max-tok"),
])
def test_cli_mistakes_exit_2_naming_the_key(argv, message, capsys):
    from hope_scale.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
