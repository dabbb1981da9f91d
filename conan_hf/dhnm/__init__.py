"""Dynamic Hard Negative Mining (paper §3.4, eq. 6): negative pools, the collator that fills a batch's negatives and
the callback that applies eq. 6 to the scores the loss already computed."""

from .pool import (
    DHNMCallback,
    DHNMDataCollator,
    FalseNegativeCountCallback,
    NegativePool,
    dhnm_should_replace,
)

__all__ = ["DHNMCallback", "DHNMDataCollator", "FalseNegativeCountCallback", "NegativePool", "dhnm_should_replace"]
