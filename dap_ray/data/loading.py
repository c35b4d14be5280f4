"""The rule every training dataset here follows for images that cannot be read. Plain torch."""

from __future__ import annotations

import torch

__all__ = ["ReplacingDataset"]


class ReplacingDataset(torch.utils.data.Dataset):
    """A dataset whose ``_load(index, *rest)`` returns a sample, or None (after printing why) for an
    image it cannot use; ``dataset[index]`` or ``dataset[(index, *rest)]`` then gives the next
    usable image instead.

    Under DDP every rank must take every step: a rank whose batch came out empty would skip
    one, the ranks would fall out of step (gloo aborts, NCCL hangs) and every restart would
    replay it. Replacing keeps each batch full; :attr:`replace` False gives None instead (for
    evaluation, where ranks need not keep step and a collate can drop it).
    """

    # How far to look for a usable image before giving up on the data.
    ATTEMPTS = 16
    replace = True

    def _load(self, index: int, *rest) -> object | None:
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        return f"image {index}"

    def __getitem__(self, key):
        index, *rest = key if isinstance(key, tuple) else (key,)
        for attempt in range(self.ATTEMPTS if self.replace else 1):
            sample = self._load((index + attempt) % len(self), *rest)
            if sample is not None:
                return sample
        if not self.replace:
            return None
        raise RuntimeError(f"{self.ATTEMPTS} images in a row from {self._describe(index)} on could not be read")
