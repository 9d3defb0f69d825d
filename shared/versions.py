"""Version numbers both sides of the wire check before trusting each other."""
from trainer import HARNESS_VERSION

# Bump on any incompatible change to the messages in shared/protocol.py.
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "HARNESS_VERSION"]
