"""A batch drawn at once by a dataset's ``__getitems__``, passed through ``collate`` untouched."""

from __future__ import annotations

import torch

__all__ = ["PreBatched"]


class PreBatched(list):
    """A list of the batch's length (so samplers and Opacus see its size) carrying the batch dict."""

    def __init__(self, batch: dict[str, torch.Tensor], size: int) -> None:
        super().__init__(range(int(size)))
        self.batch = batch
