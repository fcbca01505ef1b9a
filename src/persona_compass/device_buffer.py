"""A (batch, tokens) tensor on the model's device that grows by doubling.

Live readings append one forward's values per call; copying them to the host every step
would stall the GPU, so they stay here until someone reads a slice.
"""

from __future__ import annotations

import torch
from torch import Tensor


class DeviceBuffer:
    """Rows of per-token values, appended without a host sync.

    A batch size different from the stored one starts the buffer over (``append`` returns
    True then, so the caller can say so).
    """

    def __init__(self, dtype: torch.dtype, capacity: int = 256) -> None:
        self.dtype = dtype
        self.capacity = max(1, capacity)
        self.data: Tensor | None = None
        self.length = 0

    def append(self, rows: Tensor) -> bool:
        """Append ``rows`` (batch, steps); True when a new batch size restarted the buffer."""
        batch, steps = rows.shape
        buf, used = self.data, self.length
        restarted = False
        if buf is None or buf.shape[0] != batch:
            restarted = buf is not None and used > 0
            buf = torch.zeros(
                batch, max(self.capacity, steps), dtype=self.dtype, device=rows.device
            )
            used = 0
        elif used + steps > buf.shape[1]:
            grown = torch.zeros(batch, 2 * (used + steps), dtype=self.dtype, device=buf.device)
            grown[:, :used] = buf[:, :used]
            buf = grown
        buf[:, used : used + steps] = rows
        self.data, self.length = buf, used + steps
        return restarted

    def reset(self) -> None:
        """Forget the values (the memory is kept for reuse)."""
        self.length = 0

    def row(self, row: int, start: int, end: int) -> Tensor:
        """Values ``[start, end)`` of one row, clipped to what was recorded (a view)."""
        if self.data is None:
            return torch.empty(0, dtype=self.dtype)
        return self.data[row, start : min(end, self.length)]
