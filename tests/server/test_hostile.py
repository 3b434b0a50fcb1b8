"""A hostile client against a real server: each defect found by probing the server as an
attacker would is reproduced here and must stay fixed."""

from __future__ import annotations
