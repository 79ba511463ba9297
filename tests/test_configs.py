import pytest
from conftest import CONF, compose_config
from hydra.errors import ConfigCompositionException


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "data", "method", "trainer", "logger", "experiment", "sweep", "arm", "launcher", "task", "lora_scaling"])
def test_every_option_of_every_group_composes(group):
    for option in options(group):
        cfg = compose_config(f"{group}={option}")
        assert cfg.method.name and cfg.trainer.lr is not None and cfg.data.cache_dir


def test_defaults():
    cfg = compose_config()
    assert cfg.model.source == "embedded" and cfg.data.name == "rotten_tomatoes"
    assert cfg.method.name == "lora" and list(cfg.method.targets) == ["q", "v"]
    assert cfg.method.r == 8 and cfg.method.alpha == 8 and cfg.method.init == "kaiming"
    assert cfg.logger.mode == "auto" and cfg.model.trust_remote_code is False


def test_per_method_learning_rates():
    lrs = {m: compose_config(f"method={m}").trainer.lr for m in ("full", "head", "adapter", "lora")}
    assert lrs["full"] < lrs["lora"] <= lrs["adapter"] and lrs["full"] < lrs["head"]
    assert compose_config("method=lora", "trainer.lr=0.002").trainer.lr == 0.002


def test_unknown_group_option_is_hydras_clear_error():
    with pytest.raises(ConfigCompositionException, match="method/no_such_method"):
        compose_config("method=no_such_method")


def test_compare_experiment_is_a_multirun_over_methods():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=compare"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params.method == "full,head,adapter,lora"
    assert cfg.data.max_train == 2000
