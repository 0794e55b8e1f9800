import re

import pytest

from alldetect.config import load_config, parse_overrides, valid_keys
from alldetect.errors import UserError


def test_layers_base_then_arch_then_overrides():
    cfg = load_config("proposed", ["lr=3e-4", "epochs=20", "data.k=3", "recipe=report"])
    assert cfg.optimizer == "sgd" and cfg.batch_size == 30 and cfg.input_size == 300  # recipe, proposed.yaml
    assert cfg.lr == pytest.approx(3e-4) and cfg.epochs == 20 and cfg.data.k == 3  # overrides, typed
    assert cfg.data.crop == 400 and cfg.aug.rot90 == 0.5  # base.yaml


def test_report_recipe():
    cfg = load_config("proposed", ["recipe=report"])
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.monitor) == ("sgd", 2e-4, 30, 100, "accuracy")
    assert (cfg.momentum, cfg.weight_decay, cfg.scheduler, cfg.input_size) == (0.0, 0.0, "none", 300)
    assert (cfg.aug.rot90, cfg.aug.rot270, cfg.aug.hflip, cfg.aug.vflip) == (0.5, 0.5, 0.5, 0.5)
    assert load_config("resnet50", ["recipe=report", "lr=0.01"]).lr == 0.01  # overrides still win
    assert load_config("proposed").optimizer != "sgd"  # the report's recipe is not the default


def test_unknown_recipe_lists_the_recipes():
    with pytest.raises(UserError, match=r"recipe=paper: no such recipe; choose one of .*report"):
        load_config("proposed", ["recipe=paper"])


def test_demo_profile_applies_on_top():
    cfg = load_config("resnet50", profile="demo")
    assert cfg.input_size == 64 and cfg.epochs == 20 and cfg.optimizer == "adamw"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UserError, match=r"unknown config key 'learning_rate'.*Valid keys:.*\blr\b"):
        load_config("proposed", ["learning_rate=0.1"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(UserError, match=r"epochs='many'") as error:
        load_config("proposed", ["epochs=many"])
    assert "Valid keys" not in str(error.value)  # the key is right: listing every key would only bury the message
    with pytest.raises(UserError, match=r"optimizer='adamx': .*not an optimiser"):
        load_config("proposed", ["optimizer=adamx"])
    assert load_config("proposed", ["optimizer=lamb"]).optimizer == "lamb"  # any of timm's


def test_not_key_value():
    with pytest.raises(UserError, match="not a key=value"):
        parse_overrides(["lr"])


def test_data_root_from_environment(monkeypatch):
    monkeypatch.setenv("ALLDETECT_DATA", "/data/cnmc")
    assert load_config("proposed").data.root == "/data/cnmc"
    assert load_config("proposed", ["data.root=/elsewhere"]).data.root == "/elsewhere"  # the command line wins


def test_config_file_layer(tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("lr: 0.01\ndata:\n  crop: 0\n")
    cfg = load_config("resnet50", files=[extra])
    assert cfg.lr == 0.01 and cfg.data.crop == 0 and cfg.data.k == 5


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config("resnet50", files=[bad])
    bad.write_text("nonsense: 1\n")
    with pytest.raises(UserError, match="unknown key 'nonsense'"):
        load_config("resnet50", files=[bad])


def test_valid_keys_are_dotted():
    keys = valid_keys()
    assert "data.root" in keys and "aug.rot90" in keys and "lr" in keys and "data" not in keys


def test_data_root_precedence_command_line_then_config_file_then_environment(tmp_path, monkeypatch):
    config_file = tmp_path / "mine.yaml"
    config_file.write_text("data:\n  root: /data/from-file\n")
    monkeypatch.setenv("ALLDETECT_DATA", "/data/from-env")
    assert load_config("proposed").data.root == "/data/from-env"
    assert load_config("proposed", files=[config_file]).data.root == "/data/from-file"
    assert load_config("proposed", ["data.root=/data/from-cli"], files=[config_file]).data.root == "/data/from-cli"
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("data: 5\n")
    with pytest.raises(UserError, match=r"data=5: Input should be a valid dictionary"):
        load_config("proposed", files=[malformed])
    monkeypatch.delenv("ALLDETECT_DATA")
    assert load_config("proposed").data.root is None


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(UserError, match="resume=true and overwrite=true contradict each other"):
        load_config("proposed", ["resume=true", "overwrite=true"])


def test_arch_is_the_commands_argument_not_a_setting(tmp_path):
    with pytest.raises(UserError, match=r"'arch=resnet50': the architecture is the command's first argument"):
        load_config("proposed", ["arch=resnet50"])
    assert "arch" not in valid_keys()
    other = tmp_path / "other.yaml"
    other.write_text("arch: resnet50\nlr: 0.01\n")
    with pytest.raises(UserError, match=r"other.yaml sets arch: resnet50, but the command trains proposed"):
        load_config("proposed", files=[other])
    assert load_config("resnet50", files=[other]).lr == 0.01


def test_an_override_that_is_not_valid_yaml_is_a_clear_error():
    with pytest.raises(UserError, match=r"'study=@team': the value is not valid YAML .*quote it"):
        load_config("proposed", ["study=@team"])


def test_each_question_about_a_setting_is_answered_by_its_role():
    """Resume, a study's workers and a search space all read the roles on the config's fields."""
    from alldetect.engine.rundir.prepare import RESUMABLE_CHANGES
    from alldetect.search_space import NOT_SEARCHABLE
    from alldetect.tune import RUNTIME_KEYS

    keys = set(valid_keys()) | {"arch"}
    assert RESUMABLE_CHANGES | RUNTIME_KEYS | NOT_SEARCHABLE <= keys
    # where things are may change anywhere: a run resumed on a copy of its own split, data moved to another disk
    assert {"data.fold_file", "data.root", "runs_dir", "pretrained_path"} <= RESUMABLE_CHANGES & RUNTIME_KEYS
    # the same experiment in other bits: workers of one study may differ, a resumed run (exact by design) may not
    assert {"amp", "channels_last", "augment_on"} <= RUNTIME_KEYS - RESUMABLE_CHANGES
    # what the experiment is: never changed on resume, compared across a study, searchable
    for key in ("lr", "batch_size", "dropout", "aug.rotate", "select", "ema", "recipe", "max_batches", "seed"):
        assert key not in RESUMABLE_CHANGES | RUNTIME_KEYS | NOT_SEARCHABLE, key
    assert {"epochs", "patience"} <= RESUMABLE_CHANGES - NOT_SEARCHABLE  # a run may be extended; length is searchable
    assert {"data.k", "data.split_by"} <= NOT_SEARCHABLE - RUNTIME_KEYS  # the split: compared, never searched


def test_options_are_told_from_paths_by_their_form_not_by_the_disk(tmp_path, monkeypatch):
    from alldetect.options import parse_options, split_options

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tta=d8").mkdir()  # a folder that looks like an option stays an option
    tokens = ["runs/proposed", "tta=d8", "./tta=d8", "runs/a=b", "threshold=0.4", "tta=none"]
    assert split_options(tokens) == (["runs/proposed", "./tta=d8", "runs/a=b"], {"tta": "none", "threshold": "0.4"})
    with pytest.raises(UserError, match=r"tta=d8 is read as the option tta=; to name the folder tta=d8, write ./tta=d8"):
        split_options(["tta=d8"])  # nothing else to run on: the folder was meant
    (tmp_path / "odd=1").mkdir()
    with pytest.raises(UserError, match=r"unknown option odd= for `alldetect predict` \(to name the folder odd=1, "
                                        r"write ./odd=1\). Valid options: tta="):
        parse_options({"odd": "1"}, {"tta": ("none", str)}, "predict")


@pytest.mark.parametrize("name", ["../base", "../recipes/report", "/etc/passwd", "report.yaml", ".hidden"])
def test_a_recipe_is_the_name_of_a_file_in_configs_recipes(name):
    with pytest.raises(UserError, match=rf"recipe={re.escape(name)}: no such recipe; choose one of .*report.*"
                                        r"name of a file in .*recipes"):
        load_config("proposed", [f"recipe={name}"])


def test_freeze_epochs_must_leave_epochs_that_train_the_whole_network():
    with pytest.raises(UserError, match=r"freeze_epochs=5.*epochs=1.*only the head.*freeze_epochs=0"):
        load_config("proposed", ["freeze_epochs=5", "epochs=1"])
    with pytest.raises(UserError, match=r"freeze_epochs=3"):
        load_config("proposed", ["freeze_epochs=3", "epochs=3"])
    assert load_config("proposed", ["freeze_epochs=2", "epochs=3"]).freeze_epochs == 2


def test_mixup_needs_two_images_a_batch():
    with pytest.raises(UserError, match=r"cutmix=1.0 mixes pairs of images.*batch_size=1.*batch_size=2"):
        load_config("proposed", ["batch_size=1", "cutmix=1.0"])
    assert load_config("proposed", ["batch_size=3", "mixup=0.4"]).mixup == 0.4
