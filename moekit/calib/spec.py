"""Which text a command reads and how it is cut: one frozen record built once by the CLI
(`cli/common.py`, `run_data_options`) and passed down as is; budgets a command resolves later
(e.g. `prune --data`'s memory-adaptive token count) are returned as their own records.

`max_tokens` has one meaning in every command: the tokens read in total over all sources, an
equal share `max_tokens // len(sources)` from each (a source shorter than its share gives what
it has). None: the command's own default (docs/options.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from moekit.calib.data import DataSource, default_sources
from moekit.errors import InvalidArgumentError

MIN_SHARE = 2  # tokens: the fewest one source may give (one predicted token)


@dataclass(frozen=True)
class DataSpec:
    """Calibration or evaluation data: `sources` (empty: sample_data/), `fraction` (START, END)
    of each, the JSON field holding the text, a tokenizer other than the model's, window length
    and the token budget in total (see the module docstring)."""

    sources: tuple[DataSource, ...] = ()
    fraction: tuple[float, float] = (0.0, 1.0)
    text_field: str = "text"
    tokenizer: str | None = None
    seq_len: int = 512
    max_tokens: int | None = None

    def resolved_sources(self) -> list[DataSource]:
        """The sources, or the texts of sample_data/ when none were given."""
        return list(self.sources) or default_sources()

    def total(self, default: int) -> int:
        """The token budget in total: `max_tokens`, or `default` when unset."""
        return self.max_tokens if self.max_tokens is not None else default

    def per_source(self, default: int) -> int:
        """Each source's equal share of the budget (`per_source`)."""
        return per_source(self.total(default), len(self.resolved_sources()))


def per_source(total: int, count: int) -> int:
    """The equal share of `total` tokens each of `count` sources gives: total // count,
    refused below MIN_SHARE."""
    share = total // max(count, 1)
    if share < MIN_SHARE:
        raise InvalidArgumentError(
            f"--max-tokens {total} over {count} data sources leaves {share} tokens to each",
            f"pass --max-tokens {MIN_SHARE * count} or more")
    return share
