import pytest

from sida.server.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for k in [k for k in os.environ if k.startswith("SIDA_")]:
        monkeypatch.delenv(k)


def write(tmp_path, text):
    p = tmp_path / "sida.yaml"
    p.write_text(text)
    return p


def test_defaults_point_at_the_demo_model(demo_dir):
    s = load_settings()
    assert s.model_dir == demo_dir and s.port == 8000 and s.device == "auto"


def test_precedence_yaml_env_flags(tmp_path, tiny_dir, demo_dir, monkeypatch):
    cfg = write(tmp_path, f"model_dir: {tiny_dir}\nport: 9001\ntorch_threads: 3\n")
    s = load_settings(cfg)
    assert (s.model_dir, s.port, s.torch_threads) == (tiny_dir, 9001, 3)
    monkeypatch.setenv("SIDA_PORT", "9002")
    s = load_settings(cfg)
    assert (s.model_dir, s.port) == (tiny_dir, 9002)
    s = load_settings(cfg, port=9003, model_dir=str(demo_dir), torch_threads=None)  # None = flag not given
    assert (s.model_dir, s.port, s.torch_threads) == (demo_dir, 9003, 3)


def test_config_file_from_env(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("SIDA_CONFIG", str(write(tmp_path, f"model_dir: {tiny_dir}\n")))
    assert load_settings().model_dir == tiny_dir


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(SettingsError, match="unknown setting 'prot'"):
        load_settings(write(tmp_path, "prot: 80\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(SettingsError, match="setting 'port'.*integer"):
        load_settings(write(tmp_path, "port: eighty\n"))


def test_bad_env_value_is_named(monkeypatch):
    monkeypatch.setenv("SIDA_HASH_TORCH_THREADS", "0")
    with pytest.raises(SettingsError, match="setting 'hash_torch_threads': must be >= 1"):
        load_settings()


def test_missing_model_dir(tmp_path):
    with pytest.raises(SettingsError, match="model directory .*nope does not exist"):
        load_settings(model_dir=str(tmp_path / "nope"))


def test_model_dir_without_config(tmp_path):
    with pytest.raises(SettingsError, match="no config.json"):
        load_settings(model_dir=str(tmp_path))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "absent.yaml")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(write(tmp_path, "port: [1,\n"))
    with pytest.raises(SettingsError, match="must be a mapping"):
        load_settings(write(tmp_path, "- 1\n- 2\n"))


def test_shipped_default_yaml_is_valid(demo_dir, monkeypatch):
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    s = load_settings(REPO / "configs" / "default.yaml")
    assert isinstance(s, Settings) and s.model_dir.resolve() == demo_dir


def test_offload_settings_are_validated():
    with pytest.raises(SettingsError, match="setting 'budget_experts': must be >= 1"):
        load_settings(budget_experts=0)
    with pytest.raises(SettingsError, match="setting 'policy'"):
        load_settings(policy="mru")
    with pytest.raises(SettingsError, match="not both"):
        load_settings(budget_experts=2, budget_bytes=10**6)
    cfg = load_settings(mode="exact", budget_bytes=10**6, policy="fifo", tier="disk").offload_config()
    assert (cfg.mode, cfg.budget_bytes, cfg.policy, cfg.tier) == ("exact", 10**6, "fifo", "disk")
