"""The README's first command: `passerelle demo` brings up Synapse, mail and the bridge."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import subprocess_env


def test_demo_check_runs_twice_on_the_same_state(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    for _ in range(2):  # the second run reuses the tokens, database and Synapse data
        result = subprocess.run(
            [sys.executable, "-m", "bridge", "demo", "--check", "--dir", str(folder)],
            capture_output=True,
            env=subprocess_env(),
            text=True,
            timeout=110,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Log in as:   @demo:localhost" in result.stdout
        assert "• status" in result.stdout
        # The linked list room got a mail through SMTP → Postfix → Dovecot → the bridge.
        assert "a first mail sent through Postfix is in it" in result.stdout
        # And a reply written in Matrix went out by mail (the demo waits for the ✉️ reaction).
        assert "a reply to the first mail already went out" in result.stdout
    config = (folder / "config.yaml").read_text()
    assert "generate" not in config
    assert (folder / "registration.yaml").stat().st_mode & 0o077 == 0
