"""Triton kernels and their launchers (backend ``triton``). ``OPS`` maps op name -> launcher."""

from __future__ import annotations

OPS: dict = {}
