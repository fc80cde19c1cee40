"""Host copies of small flag and count buffers, so that Python branches on them never wait for the device."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class HostFlags(nn.Module):
    """A module whose small buffers (flags, step counts) have host copies: :meth:`_host` reads a buffer's
    copy, :meth:`_set_host` records one after the module wrote the buffer itself. A copy is read again (once)
    only when its buffer was replaced or written by someone else since (a state dict loaded by any route, a
    move to another device), told by the buffer's identity and version; a compiled graph uses the copy as it
    is."""

    def __init__(self):
        super().__init__()
        self._host_values: dict[str, bool | int] = {}
        self._host_keys: dict[str, tuple[int, int]] = {}

    def _host(self, name: str, read: Callable[[torch.Tensor], bool | int]) -> bool | int:
        """The host copy of buffer ``name`` (``read`` turns the buffer into it when it must be read again)."""
        buf = getattr(self, name)
        if not torch.compiler.is_compiling() and self._host_keys.get(name) != (id(buf), buf._version):
            self._set_host(name, read(buf))
        return self._host_values[name]

    def _set_host(self, name: str, value: bool | int) -> None:
        """Record ``value`` as the host copy of buffer ``name`` as it is now (after writing it ourselves)."""
        buf = getattr(self, name)
        self._host_values[name], self._host_keys[name] = value, (id(buf), buf._version)
