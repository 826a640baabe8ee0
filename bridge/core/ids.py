"""Identifier types shared by every adapter."""

from typing import NewType

UserID = NewType("UserID", str)
RoomID = NewType("RoomID", str)
EventID = NewType("EventID", str)
TxnID = NewType("TxnID", str)
