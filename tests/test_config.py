from pathlib import Path

import pytest

from smallgpt.config import (
    KEYS,
    SECTIONS,
    Config,
    load_config,
    parse_overrides,
    read_config_file,
    save_config,
)
from smallgpt.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_yaml_sections_flat_keys_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 3\nbatch_size: 7\nlearning_rate: 1e-3\ndataset: d\n")
    config = load_config(path, ["--n_layer=5", "--optim.min_lr", "1e-5", "--compile"])
    assert config.model.n_layer == 5  # the command line wins over the file
    assert config.train.batch_size == 7
    assert config.optim.learning_rate == 1e-3 and config.optim.min_lr == 1e-5
    assert config.train.compile is True


def test_nanogpt_python_config_runs_unchanged(tmp_path):
    path = tmp_path / "train_shakespeare_char.py"
    path.write_text(
        "out_dir = 'out-shakespeare-char'\neval_interval = 250\neval_iters = 200\nlog_interval = 10\n"
        "always_save_checkpoint = False\nwandb_log = False\nwandb_project = 'shakespeare-char'\n"
        "wandb_run_name = 'mini-gpt'\ndataset = 'shakespeare_char'\ngradient_accumulation_steps = 1\n"
        "batch_size = 64\nblock_size = 256\nn_layer = 6\nn_head = 6\nn_embd = 384\ndropout = 0.2\n"
        "learning_rate = 1e-3\nmax_iters = 5000\nlr_decay_iters = 5000\nmin_lr = 1e-4\nbeta2 = 0.99\n"
        "warmup_iters = 100\n"
    )
    config = load_config(path)
    assert config.model.block_size == 256 and config.optim.beta2 == 0.99
    assert config.data.dataset == "shakespeare_char" and config.log.wandb_run_name == "mini-gpt"


@pytest.mark.parametrize(
    "override, message",
    [
        ("--n_layr=4", "did you mean 'n_layer'"),
        ("--learning_rate=fast", "must be float"),
        ("--batch_size=1.5", "must be int"),
        ("--compile=maybe", "must be bool"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_yaml_typo_names_file_and_close_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_embed: 64\n")
    with pytest.raises(UserError, match=r"n_embed.*c.yaml.*'(model\.)?n_embd'"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--batch_size=0", "batch_size must be positive"),
        ("--n_layer=-1", "n_layer must be positive"),
        ("--learning_rate=-1", "learning_rate must not be negative"),
        ("--n_embd=100", "divisible by n_head"),
    ],
)
def test_validation_rejects_bad_values(override, message):
    config = load_config(None, ["--dataset=x", override])
    with pytest.raises(UserError, match=message):
        config.validate()


def test_missing_dataset_and_missing_file():
    with pytest.raises(UserError, match="dataset is not set"):
        Config().validate()
    with pytest.raises(UserError, match="does not exist"):
        read_config_file("nope.yaml")


def test_override_forms():
    assert parse_overrides(["--a=1", "--b", "2", "--max-iters=3"]) == {"a": "1", "b": "2", "max_iters": "3"}
    with pytest.raises(UserError, match="needs a value"):
        parse_overrides(["--n_layer"])


def test_saved_config_loads_back(tmp_path):
    config = load_config(None, ["--dataset=d", "--n_layer=2"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_is_valid_and_sets_what_it_says(path):
    config = load_config(path)
    config.validate()
    written = {}  # every key the file names, flat
    for key, value in read_config_file(path).items():
        written.update({f"{key}.{k}": v for k, v in value.items()} if key in SECTIONS else {key: value})
    assert written
    for key, value in written.items():
        section, name = KEYS[key]
        assert getattr(getattr(config, section), name) == value, f"{path.name}: {key}"


def test_fsdp_accepts_only_adamw():
    config = load_config(None, ["--dataset=x", "--parallel=fsdp", "--optimizer=muon"])
    with pytest.raises(UserError, match="does not support parallel=fsdp"):
        config.validate()
    load_config(None, ["--dataset=x", "--parallel=fsdp"]).validate()
