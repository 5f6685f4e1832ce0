"""Config: presets, YAML + dotted overrides, and bad values failing before any work."""
import subprocess
import sys

import pytest

from ibtpo_fast.config import PRESETS, ConfigError, dump_yaml, load_config


def test_defaults_follow_the_paper():
    c = load_config([])
    assert (c.rollout.strategy, c.rollout.tree, c.algo.beta, c.algo.lam) == ("ib", "4,9,1,1", 5.0, 0.1)
    assert (c.algo.clip_low, c.algo.clip_high, c.algo.kl_coef, c.algo.loss_agg) == (0.2, 0.2, 0.001, "token-mean")


def test_remote_code_off_unless_asked():
    assert load_config([]).model.trust_remote_code is False
    assert "trust_remote_code: false" in dump_yaml(load_config([]))  # printed and saved with the run
    assert load_config(["model.trust_remote_code=true"]).model.trust_remote_code is True


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("algo:\n  beta: 3\ntrain:\n  steps: 7\n")
    c = load_config(["--config", str(f), "train.steps=9", "rollout.tree=2,3,1,2"])
    assert c.algo.beta == 3.0 and c.train.steps == 9 and c.rollout.tree == "2,3,1,2"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_resolve(name):
    c = load_config([f"preset={name}"])
    assert c.preset == name


def test_clip_higher_preset():
    c = load_config(["preset=grpo_clip_higher"])
    assert c.algo.clip_high == 0.28 and c.rollout.strategy == "independent" and c.algo.lam == 0.0


@pytest.mark.parametrize("arg, key", [
    ("algo.nope=1", "algo.nope"),
    ("nope.beta=1", "nope.beta"),
    ("train.steps=-3", "train.steps"),
    ("rollout.tree=4,0,1,1", "rollout.tree"),
    ("rollout.tree=4,9,1", "rollout.tree"),
    ("rollout.strategy=greedy", "rollout.strategy"),
    ("algo.beta=0", "algo.beta"),
    ("train.lr=abc", "train.lr"),
    ("preset=ppo", "preset"),
])
def test_bad_values_name_the_key(arg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([arg])


def test_cli_rejects_bad_config_before_any_work():
    r = subprocess.run([sys.executable, "-m", "ibtpo_fast.train", "train.steps=-1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "train.steps" in r.stderr


def test_step_delimiter_escapes():
    assert load_config([r"rollout.step_delimiter=\n\n"]).rollout.step_delimiter == "\n\n"


def test_schedule_is_checked():
    assert load_config([]).rollout.schedule == "continuous"
    with pytest.raises(ConfigError, match="rollout.schedule"):
        load_config(["rollout.schedule=sometimes"])


def test_ref_offload_needs_fsdp_and_a_reference(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"train.ref_offload: .*launch under torchrun"):
        load_config(["train.ref_offload=true"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"train.ref_offload: .*use train.parallel=fsdp \(not ddp\)"):
        load_config(["train.ref_offload=true", "train.parallel=ddp"])
    with pytest.raises(ConfigError, match="train.ref_offload: algo.kl_coef is 0"):
        load_config(["train.ref_offload=true", "algo.kl_coef=0"])
    assert load_config(["train.ref_offload=true"]).train.ref_offload
