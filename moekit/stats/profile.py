"""The profile record: routing statistics of one `moekit profile` run, as loaded or recorded.

Built and read by `profile_io` (files), read by `metrics`, `uncertainty`, `report` and the
plots. Only a record: no file access here, and no numpy/pandas import at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

ALL = "all"


@dataclass
class Profile:
    """A loaded or freshly recorded profile. `coactivation["{domain}/{layer}"]` is [E, E]."""

    metadata: dict[str, Any]
    expert_stats: pd.DataFrame
    layer_stats: pd.DataFrame
    coactivation: dict[str, np.ndarray]
    trace: dict[str, np.ndarray] | None = field(default=None, repr=False)
    windows: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def domains(self) -> list[str]:
        """Domain names in recording order, without `all`."""
        return list(self.metadata.get("domains", {}))

    @property
    def moe_layers(self) -> list[int]:
        return [int(i) for i in self.metadata["moe_layers"]]

    @property
    def fingerprint(self) -> str:
        return str(self.metadata.get("model_fingerprint", ""))

    def coact(self, layer: int, domain: str = ALL) -> np.ndarray:
        return self.coactivation[f"{domain}/{layer}"]

    def experts(self, layer: int, domain: str = ALL) -> pd.DataFrame:
        """The expert_stats rows of one layer and domain, sorted by expert id."""
        frame = self.expert_stats
        rows = frame[(frame["layer"] == layer) & (frame["domain"] == domain)]
        return rows.sort_values("expert").reset_index(drop=True)
