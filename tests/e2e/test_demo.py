"""The README's first command: `passerelle demo` brings up Synapse, mail and the bridge, the
other ministry's homeserver with a room linked to it, and a room with webhooks both ways."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import subprocess_env


def test_demo_check_runs_twice_on_the_same_state(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    kept: list[tuple[str, str]] = []
    for _ in range(2):  # the second run reuses the tokens, database, rooms and Synapse data
        result = subprocess.run(
            [sys.executable, "-m", "bridge", "demo", "--check", "--dir", str(folder)],
            capture_output=True,
            env=subprocess_env(),
            text=True,
            timeout=110,
        )
        out = result.stdout
        assert result.returncode == 0, out + result.stderr
        assert "Log in as:   @demo:localhost" in out
        assert "• status" in out
        # The linked list room got a mail through SMTP → Postfix → Dovecot → the bridge.
        assert "a first mail sent through Postfix is in it" in out
        # And a reply written in Matrix went out by mail (the demo waits for the ✉️ reaction).
        assert "a reply to the first mail already went out" in out
        # The ministry's homeserver, and a message relayed each way between the linked rooms.
        assert "(server name ministere.localhost)" in out
        assert "Log in as:   @demo:ministere.localhost  password: " in out
        assert "arrived here from the ghost “Demo Bruno (Ministère)”" in out
        assert (
            "the reply went back from @passerelle-agence:ministere.localhost as "
            "“Demo Claire (Agence) : Bien reçu (" in out
        )
        # The webhook room: a signed request posted in it, the reply received and verified by
        # the legacy receiver; the hooks made through the provisioning API.
        assert "The room 'Supervision (demo)' (!" in out
        assert "to the inbound hook 'alertes' was posted there by its ghost" in out
        assert "verified it: message.created “Pris en charge (" in out
        assert "/webhooks/v1/alertes  (secret in " + str(folder / "alertes.whsec") + ")" in out
        assert "    python3 -c 'import base64,hashlib,hmac" in out  # the line the demo ran
        assert "Provisioning API (its secret in " + str(folder / "provisioning-secret") in out
        assert "/_passerelle/provision/v1/webhooks?user_id=@demo:localhost'" in out
        for secret in ("alertes.whsec", "provisioning-secret"):
            assert (folder / secret).read_text().strip() not in out + result.stderr
        kept.append(
            (
                (folder / "remote-rooms").read_text(),
                (folder / "ministere-token").read_text(),
                (folder / "hooks-room").read_text(),
                (folder / "alertes.whsec").read_text(),
                (folder / "provisioning-secret").read_text(),
            )
        )
    # Same linked rooms, same token for the bridge's account, same webhook room, inbound hook
    # and provisioning secret: nothing made twice.
    assert kept[0] == kept[1]
    config = (folder / "config.yaml").read_text()
    assert "generate" not in config
    assert "access_token_file: ministere-token" in config
    assert "shared_secret_file: provisioning-secret" in config
    for secret in ("registration.yaml", "ministere-token", "alertes.whsec", "provisioning-secret"):
        assert (folder / secret).stat().st_mode & 0o077 == 0
