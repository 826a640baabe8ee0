"""The `instance:` section: leases off by default, timings checked against each other."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.config import ConfigError, parse_config
from tests.unit.test_config import minimal


def test_one_instance_without_leases_by_default() -> None:
    instance = parse_config(minimal(), env={}).instance
    assert not instance.leases
    assert instance.id is None
    assert (instance.lease_ttl, instance.lease_renew) == (15.0, 5.0)


def test_several_instances() -> None:
    instance = parse_config(
        minimal(instance={"leases": True, "id": "mail-a.prod", "lease_ttl": 30}), env={}
    ).instance
    assert instance.leases
    assert instance.id == "mail-a.prod"
    assert instance.lease_ttl == 30.0


def test_env_override() -> None:
    config = parse_config(
        minimal(), env={"PASSERELLE_INSTANCE__LEASES": "true", "PASSERELLE_INSTANCE__ID": "b"}
    )
    assert config.instance.leases
    assert config.instance.id == "b"


@pytest.mark.parametrize(
    ("values", "key", "why"),
    [
        ({"lease_ttl": 10, "lease_renew": 6}, "instance.lease_renew", "at most half"),
        ({"lease_ttl": 1}, "instance.lease_ttl", "between"),
        ({"lease_renew": 0}, "instance.lease_renew", "between"),
        ({"lease_ttl": "15s"}, "instance.lease_ttl", "number"),
        ({"leases": "yes"}, "instance.leases", "true or false"),
        ({"id": "two words"}, "instance.id", "no spaces"),
        ({"id": "a\nb"}, "instance.id", "no spaces"),
        ({"id": "x" * 201}, "instance.id", "1 to 200"),
        ({"id": ""}, "instance.id", "empty"),
        ({"id": 7}, "instance.id", "string"),
    ],
)
def test_refused_with_the_key(values: dict[str, Any], key: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(instance=values), env={})
    assert caught.value.key == key
    assert why in str(caught.value)
