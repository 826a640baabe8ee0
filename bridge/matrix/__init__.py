"""The Matrix side: appservice HTTP API, homeserver client, management bot."""
