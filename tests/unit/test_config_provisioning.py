"""The `provisioning:` section: off by default, a secret inline or in a file, never logged."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, parse_config
from tests.unit.test_config import minimal

SECRET = "prov-" + "Q1w2E3r4" * 5


def test_off_by_default() -> None:
    config = parse_config(minimal(), env={})
    assert config.provisioning.shared_secret is None
    assert not config.provisioning.enabled


def test_inline_secret_is_redacted() -> None:
    config = parse_config(minimal(provisioning={"shared_secret": SECRET}), env={})
    assert config.provisioning.enabled
    assert SECRET in config.secrets()
    assert SECRET not in repr(config)


def test_secret_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "prov.secret").write_text(SECRET + "\n", encoding="utf-8")
    config = parse_config(
        minimal(provisioning={"shared_secret_file": "prov.secret"}),
        env={},
        path=tmp_path / "config.yaml",
    )
    assert config.provisioning.shared_secret == SECRET


def test_env_override() -> None:
    config = parse_config(minimal(), env={"PASSERELLE_PROVISIONING__SHARED_SECRET": SECRET})
    assert config.provisioning.shared_secret == SECRET


@pytest.mark.parametrize(
    ("section", "key", "problem"),
    [
        ({"shared_secret": "short"}, "provisioning.shared_secret", "too short"),
        ({"shared_secret": SECRET + " x"}, "provisioning.shared_secret", "spaces"),
        (
            {"shared_secret": SECRET, "shared_secret_file": "x"},
            "provisioning.shared_secret",
            "exactly one",
        ),
        ({"shared_secret_file": "/nonexistent/secret"}, "provisioning.shared_secret_file", ""),
    ],
)
def test_refused(section: dict[str, str], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(minimal(provisioning=section), env={})
    assert e.value.key == key
    assert problem in e.value.problem
