"""Config loading: defaults, every key of the example, and one-sentence errors naming file and key path."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import config as cfg
from sidecar.config import ConfigError, load_config, parse_duration

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_watch_dot_art_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.watch.roots == (tmp_path / ".art",)
    assert config.watch.mode == "auto"
    assert config.allowed_source_roots == config.watch.roots
    assert config.source_file is None


def test_example_config_is_valid_and_documents_every_key() -> None:
    config = load_config(REPO / "config.example.yaml")
    assert config.watch.roots == (Path("/srv/art"),)
    text = (REPO / "config.example.yaml").read_text()
    for section in (
        cfg.Config,
        cfg.WatchConfig,
        cfg.SourcesConfig,
        cfg.SwapConfig,
        cfg.TimeoutsConfig,
        cfg.TrainerConfig,
        cfg.VllmConfig,
        cfg.VllmServerConfig,
        cfg.MetricsConfig,
        cfg.LogConfig,
        cfg.NodeConfig,
        cfg.CoordinationConfig,
        cfg.EtcdConfig,
    ):
        for f in dataclasses.fields(section):
            if f.name != "source_file":
                assert f"{f.name}:" in text, f"config.example.yaml does not document {section.__name__}.{f.name}"


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "watch:\n  roots: [art]\nstate_dir: state\n")
    config = load_config(path)
    assert config.watch.roots == (tmp_path / "art",)
    assert config.state_dir == tmp_path / "state"


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("watch:\n  rootz: [a]\n", "watch.rootz", "unknown key"),
        ("bogus: 1\n", "bogus", "unknown key"),
        ("watch:\n  roots: /a\n", "watch.roots", "expected a list"),
        ("watch:\n  roots: []\n", "watch.roots", "at least one"),
        ("watch:\n  mode: fast\n", "watch.mode", "expected one of auto, inotify, poll"),
        ("watch:\n  poll_interval: soon\n", "watch.poll_interval", "expected a duration"),
        ("watch:\n  poll_interval: -1\n", "watch.poll_interval", "positive"),
        ("timeouts:\n  vllm: 2 weeks\n", "timeouts.vllm", "expected a duration"),
        ("trainer:\n  required: yes please\n", "trainer.required", "expected true or false"),
        ("trainer:\n  retries: -2\n", "trainer.retries", "non-negative integer"),
        ("swap:\n  copy_mode: rsync\n", "swap.copy_mode", "expected one of"),
        ("vllm:\n  servers:\n    - api_key_env: X\n", "vllm.servers[0].url", "required key is missing"),
        ("vllm:\n  servers:\n    - url: localhost:8000\n", "vllm.servers[0].url", "http://"),
        ("metrics:\n  listen: 9464\n", "metrics.listen", "expected a string"),
        ("metrics:\n  listen: nowhere\n", "metrics.listen", "HOST:PORT"),
        ("- just\n- a list\n", "(top level)", "expected a mapping"),
        ("state_dir: 5\n", "state_dir", "expected a path"),
        ("node:\n  name: 'a b'\n", "node.name", "letters, digits"),
        ("coordination:\n  backend: zookeeper\n", "coordination.backend", "expected one of filesystem, etcd"),
        ("coordination:\n  backend: etcd\n", "coordination.etcd.endpoints", "at least one URL"),
        ("coordination:\n  etcd:\n    endpoints: [10.0.0.1:2379]\n", "coordination.etcd.endpoints[0]", "http(s)://"),
        ("coordination:\n  etcd:\n    prefix: fork\n", "coordination.etcd.prefix", "key prefix"),
        ("coordination:\n  etcd:\n    lease_ttl: 1s\n", "coordination.etcd.lease_ttl", "at least 2s"),
        ("coordination:\n  etcd:\n    cert_file: c.pem\n", "coordination.etcd", "cert_file and key_file together"),
        ("coordination:\n  etcd:\n    user: me\n", "coordination.etcd", "user and password_file together"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message
    assert message.count("\n") == 0


def test_unparseable_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "watch:\n  roots: [a\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML at line \d+"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("text", "seconds"), [(30, 30.0), ("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, "watch:\n  roots: [art]\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("watch:\n  mode: sometimes\n")
    run = [sys.executable, "-m", "sidecar", "check-config", "--config"]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    fail = subprocess.run([*run, str(bad)], capture_output=True, text=True)
    assert fail.returncode == 2
    assert fail.stderr.strip().startswith(f"fork-sidecar: {bad}: watch.mode:")
    assert fail.stderr.strip().count("\n") == 0


def test_timeouts_verify_is_retired_an_old_config_still_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """timeouts.verify was documented as a limit and never read: gone from the schema, accepted in old configs."""
    assert "verify" not in {f.name for f in dataclasses.fields(cfg.TimeoutsConfig)}
    path = write(tmp_path, "timeouts:\n  verify: 30s\n  vllm: 1m\n")
    with caplog.at_level("WARNING", logger="sidecar.config"):
        config = load_config(path)
    assert float(config.timeouts.vllm) == 60.0
    assert f"{path}: timeouts.verify is ignored" in caplog.text and "remove it" in caplog.text
    with pytest.raises(ConfigError, match=r"timeouts\.verify2: unknown key"):  # only that one retired key
        load_config(write(tmp_path, "timeouts:\n  verify2: 30s\n"))
