import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from dap_ray.config import (
    add_config_arguments,
    config_to_dict,
    resolve_config,
    save_config,
)


@dataclass(frozen=True)
class Example:
    name: str = field(default="x", metadata={"help": "a name"})
    count: int = 3
    rate: float = 0.5
    scales: tuple[int, ...] = (288, 576)
    flip: bool = True
    mode: Literal["a", "b"] = "a"
    limit: int | None = None


def parse(argv):
    return add_config_arguments(argparse.ArgumentParser(), Example).parse_args(argv)


def test_defaults_then_yaml_then_flags(tmp_path):
    assert resolve_config(Example, parse([])) == Example()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"count": 7, "scales": [100, 200], "limit": 5}))
    config = resolve_config(Example, parse(["--config", str(path), "--count", "9", "--no-flip", "--mode", "b"]))
    assert config == Example(count=9, scales=(100, 200), flip=False, mode="b", limit=5)


def test_unknown_yaml_keys_fail_by_name(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("count: 2\ncolour: red\n")
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        resolve_config(Example, parse(["--config", str(path)]))
    with pytest.raises(ValueError, match="unknown option.*'colour'"):
        resolve_config(Example, colour="red")
    with pytest.raises(ValueError, match="config file not found"):
        resolve_config(Example, parse(["--config", str(tmp_path / "missing.yaml")]))


def test_saved_config_is_reusable(tmp_path):
    config = Example(scales=(1, 2), limit=4)
    path = save_config(config, tmp_path / "out" / "config.yaml")
    assert yaml.safe_load(path.read_text()) == config_to_dict(config)
    assert resolve_config(Example, parse(["--config", str(path)])) == config


def test_help_lists_every_field_with_its_default():
    text = add_config_arguments(argparse.ArgumentParser(), Example).format_help()
    for flag in ("--name", "--count", "--rate", "--scales", "--flip", "--mode", "--limit", "--config"):
        assert flag in text
    assert "a name (default: x)" in text and "(default: 288 576)" in text


@pytest.mark.parametrize(("options", "message"), [
    ({}, None),
    ({"device": "cpu"}, None),  # GPUs held, CPU compute: fake GPU nodes
    ({"device": "cuda", "use_gpu": True}, None),
    ({"device": "cuda"}, "device cuda needs --use-gpu"),
    ({"device": "tpu", "use_gpu": True}, "device must be auto, cuda or cpu"),
])
@pytest.mark.parametrize("step", ["classifier", "pretrain", "finetune"])
def test_the_training_steps_check_their_device_alike(step, options, message):
    from dap_ray.steps.classify import ClassifierTrainConfig
    from dap_ray.steps.finetune import FinetuneConfig
    from dap_ray.steps.pretrain import PretrainConfig

    make = {"classifier": lambda **o: ClassifierTrainConfig(data="x", **o), "pretrain": PretrainConfig,
            "finetune": FinetuneConfig}[step]
    if message is None:
        assert make(**options).device == options.get("device", "auto")
    else:
        with pytest.raises(ValueError, match=message):
            make(**options)
