"""What a link says about itself in its room's state: `m.bridge` (MSC2346) and its twin."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from bridge.core.ids import UserID
from bridge.core.links import REMOTE_KIND, Link, split_remote_key

# The event types of a link's state: the MSC's own, and the one clients read before it was
# merged (Element reads both). Both get the same content under the same state key.
BRIDGE_STATE_TYPES = ("m.bridge", "uk.half-shot.bridge")

# Key of the marking in the content of a link's m.bridge state.
MARKING_KEY = "fr.passerelle.marking"

MAIL_PROTOCOL = {"id": "email", "displayname": "Email"}
REMOTE_PROTOCOL = {"id": "matrix", "displayname": "Matrix (another ministry)"}


def bridge_state_key(link: Link) -> str:
    """One state key per link, stable across versions: rooms already marked are updated in
    place, never given a second entry."""
    return f"passerelle:{link.remote}"


def bridge_state_content(
    link: Link, *, bot_mxid: UserID, remote_server: str | None = None
) -> dict[str, Any]:
    """The content of a link's state. `remote_server` is the server name of a remote link's
    homeserver (None: the remote is no longer configured, its name stands in)."""
    content: dict[str, Any] = {"bridgebot": bot_mxid}
    if link.created_by:
        content["creator"] = link.created_by
    if link.kind == REMOTE_KIND:
        name, remote_room = split_remote_key(link.remote)
        server = remote_server or name
        content["protocol"] = dict(REMOTE_PROTOCOL)
        content["network"] = {"id": server, "displayname": name}
        content["channel"] = {
            "id": remote_room,
            "displayname": remote_room,
            "external_url": f"https://matrix.to/#/{quote(remote_room, safe='!:')}"
            f"?via={quote(server, safe='')}",
        }
    else:
        domain = link.remote.rpartition("@")[2]
        content["protocol"] = dict(MAIL_PROTOCOL)
        content["network"] = {"id": domain, "displayname": domain}
        content["channel"] = {
            "id": link.remote,
            "displayname": link.remote,
            "external_url": f"mailto:{link.remote}",
        }
    if link.settings.marking:
        content[MARKING_KEY] = link.settings.marking
    return content
