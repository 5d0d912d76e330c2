"""Human-readable views of a profile: rich tables for the terminal, report.md and report.html."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.stats.ablation import report_lines as ablation_lines
from moekit.stats.criteria import DEFAULT_CRITERION
from moekit.stats.html import write_html
from moekit.stats.metrics import (
    COLD_RATIO,
    SHARE_HEADER,
    coldest,
    specialisation,
    summary_table,
)
from moekit.stats.uncertainty import (
    DEAD_FRACTION,
    UNSTABLE,
    criterion_column,
    profile_uncertainty,
)

if TYPE_CHECKING:
    import pandas as pd

    from moekit.stats.profile import Profile

UNDERSAMPLED = 20  # expected slots per expert below this: "dead" may just mean "unseen"


def layer_rich_table(profile: Profile) -> Any:
    """Per-layer summary: tokens, dead/cold experts, max and min relative load, CV, entropy."""
    frame = summary_table(profile)
    experts = "/".join(str(e) for e in sorted(set(frame["num_experts"])))
    rows = [[str(row["layer"]), f"{row['tokens']:,}", _red(row["dead_experts"]),
             str(row["unseen_experts"]), str(row["cold_experts"]), f"{row['max_load']:.2f}x",
             f"{row['min_load']:.2f}x", f"{row['cv']:.2f}", f"{row['entropy_norm']:.2f}",
             str(row["coverage90"]), f"{row['top1_reuse']:.2f}"]
            for row in frame.to_dict("records")]
    headers = ("layer", "tokens", "dead", "unseen", "cold", "max\nload", "min\nload", "CV",
               "entropy", "N@90%", "top-1\nreuse")
    return FoldedTable(f"Routing per MoE layer, all domains ({experts} experts; load = "
                       f"L/(S/E), cold < {COLD_RATIO:g}x)", headers, rows)


class FoldedTable:
    """Right-aligned columns never truncated; on a terminal too narrow for all of them, the
    table is printed in parts (each with the first column) rather than dropping columns."""

    def __init__(self, title: str, headers: tuple[str, ...], rows: list[list[str]]):
        self.title, self.headers, self.rows = title, headers, rows

    def table(self, columns: list[int], title: str | None) -> Any:
        from rich import box
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
        for i in columns:
            cells = [len(Text.from_markup(row[i]).plain) for row in self.rows]
            width = max([*cells, *(len(part) for part in self.headers[i].split("\n"))])
            table.add_column(self.headers[i], justify="right", no_wrap=True, min_width=width)
        for row in self.rows:
            table.add_row(*(row[i] for i in columns))
        return table

    def __rich_console__(self, console: Any, options: Any) -> Any:
        chunks: list[list[int]] = [[0]]
        unbounded = options.update_width(1 << 16)
        for i in range(1, len(self.headers)):
            wider = self.table([*chunks[-1], i], None)
            if len(chunks[-1]) > 1 and console.measure(wider, options=unbounded).maximum > \
                    options.max_width:
                chunks.append([0])
            chunks[-1].append(i)
        for n, chunk in enumerate(chunks):
            title = self.title if n == 0 else "(continued)"
            yield self.table(chunk, title + (f" ({n + 1}/{len(chunks)})" if len(chunks) > 1
                                             else ""))


def _red(value: int) -> str:
    return f"[red]{value}[/]" if value else "0"


def coldest_rich_table(profile: Profile, count: int = 10) -> Any:
    frame = coldest(profile, count)
    rows = [[str(row["layer"]), str(row["expert"]), f"{row['tokens']:,}",
             f"{row['share']:.4f}", f"{row['relative_load']:.3f}x", _num(row["weight_mean"]),
             _num(row["ean_mean"]), _num(row["reap"])] for row in frame.to_dict("records")]
    return FoldedTable(f"The {len(frame)} coldest experts, all domains (EAN, REAP: means per "
                       "routed token)", ("layer", "expert", "tokens", "slot\nshare", "load",
                                         "mean\nweight", "EAN", "REAP"), rows)


def _num(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        f"{value:.4g}")


def findings(profile: Profile) -> list[str]:
    """A few sentences that summarise the profile (used by report.md and the terminal)."""
    layers = summary_table(profile)
    lines = []
    dead, cold = int(layers["dead_experts"].sum()), int(layers["cold_experts"].sum())
    total = int(layers["num_experts"].sum())
    unseen = int(layers["unseen_experts"].sum())
    dead_text = f"{dead} dead (no token; the 95% bound allows it)"
    if unseen:
        dead_text += f", {unseen} unseen (no token, but too few tokens to call them dead)"
    lines.append(f"{len(layers)} MoE layers, {total} routed experts in all: {dead_text}, "
                 f"{cold} cold (under {COLD_RATIO:g}x their fair share).")
    worst = layers.sort_values("maxvio", ascending=False).iloc[0]
    lines.append(f"Most uneven layer: {int(worst['layer'])} (busiest expert "
                 f"{worst['max_load']:.2f}x its fair share, CV {worst['cv']:.2f}); 90% of "
                 "routed slots go to "
                 f"{layers['coverage90'].min()}-{layers['coverage90'].max()} experts per layer.")
    lines.append(f"Router entropy is {layers['entropy_norm'].mean():.2f} of its maximum on average"
                 f"; consecutive tokens keep their top-1 expert {layers['top1_reuse'].mean():.0%}"
                 f" of the time (uniform random routing: "
                 f"{1 / layers['num_experts'].iloc[0]:.0%}).")
    spec = specialisation(profile)
    for domain in profile.domains:
        rows = spec[spec["domain"] == domain]
        if len(rows):
            top = rows.sort_values("relative", ascending=False).iloc[0]
            lines.append(f"`{domain}` most prefers expert {int(top['expert'])} of layer "
                         f"{int(top['layer'])} ({top['relative']:.1f}x the uniform share).")
    low = profile.layer_stats.query("domain != 'all'")["expected_per_expert"]
    if len(low) and low.min() < UNDERSAMPLED:
        lines.append(f"Warning: some domains give only {low.min():.0f} expected slots per expert;"
                     " a dead expert there may just be undersampled.")
    return lines


def named_share(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with its `share*` columns headed by their printed name (`slot share`,
    metrics.SHARE): one meaning of share in every table."""
    head = SHARE_HEADER.replace(" ", "_")
    return frame.rename(columns={c: head + c[len("share"):] for c in frame.columns
                                 if c.startswith("share")})


def markdown_table(frame: pd.DataFrame, floats: str = "{:.3f}") -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency)."""
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---:" for _ in frame.columns) + "|"
    body = []
    for row in frame.itertuples(index=False):
        cells = [("-" if math.isnan(v) else floats.format(v)) if isinstance(v, float)
                 else str(v) for v in row]
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def write_report(profile: Profile, folder: Path, plots: dict[str, str]) -> Path:
    """report.md: provenance, findings, tables and the plots; and report.html, the same page
    with the plots embedded (one file to open in a browser)."""
    meta = profile.metadata
    domains = meta.get("domains", {})
    parts = [f"# Routing profile: {Path(str(meta.get('model'))).name}", "",
             f"- model: `{meta.get('model')}` (fingerprint `{meta.get('model_fingerprint')}`, "
             f"family {meta.get('family')}, routing: {meta.get('routing', '?')})",
             f"- MoE layers: {meta.get('moe_layers')}; experts: {meta.get('num_experts')}; "
             f"top-k: {meta.get('top_k')}",
             "- data: " + ", ".join(f"`{n}` {int(i['tokens']):,} tokens" for n, i in
                                     domains.items()) +
             f" (windows of {meta.get('seq_len')} tokens, range {meta.get('data_range', '0:1')})",
             f"- moekit {meta.get('moekit_version')}, {meta.get('created')}", "",
             "## Findings", "", *[f"- {line}" for line in findings(profile)], ""]
    for kind, title in (("usage", "Expert usage"), ("specialisation", "Domain specialisation"),
                        ("load_curves", "Sorted load per layer"),
                        ("coactivation", "Co-activation")):
        if kind in plots:
            parts += [f"## {title}", "", f"![{title}]({plots[kind]})", ""]
    table = summary_table(profile)
    parts += ["## Per-layer statistics (all domains)", "", markdown_table(table), "",
              "## Coldest experts", "", markdown_table(named_share(coldest(profile))), "",
              *_uncertainty_section(profile),
              *ablation_lines(profile, plots, markdown_table),
              "## Notes", "",
              "- Loads are relative to the fair share S/E (S = tokens x k routed slots): 1 means "
              "uniform. MaxVio = max load - 1; CV = std/mean of the loads; entropy = mean router "
              "entropy / ln E; N@90% = fewest experts holding 90% of the slots.",
              f"- REAP semantics here: {meta.get('reap_semantics', '')}.",
              "- Usage is observational: a rarely used expert is not necessarily unimportant.",
              "- Formulas and file formats: docs/profile.md in the moekit repository.", ""]
    path = Path(folder) / "report.md"
    path.write_text("\n".join(parts))
    write_html(path, f"Routing profile: {Path(str(meta.get('model'))).name}")
    return path


def _uncertainty_section(profile: Profile, ratio: float = 0.25,
                         criterion: str = DEFAULT_CRITERION, shown: int = 15) -> list[str]:
    """Markdown lines for report.md: per-layer stability of pruning `ratio` of the experts by
    `criterion` (prune's default; frequency for profiles without its per-window sums), and the
    least stable experts. Empty when the profile has no windows."""
    if not profile.windows:
        return []
    if not any(k.endswith(f"/{criterion_column(criterion)}") for k in profile.windows):
        criterion = "frequency"
    experts, layers = profile_uncertainty(profile, ratio=ratio, criterion=criterion)
    k = profile.metadata.get("top_k", 1)
    top_k = dict(zip(profile.moe_layers, k if isinstance(k, list) else [k] * len(layers),
                     strict=False))
    layers["more_tokens"] = [("-" if g <= 1.0 else "inf" if g == float("inf") else
                              f"{(g - 1.0) * s / top_k.get(layer, 1):,.0f}")
                             for layer, g, s in zip(layers["layer"], layers["growth"],
                                                    layers["slots"], strict=True)]
    shaky = experts[experts["unstable"]].assign(
        margin=lambda f: (f["drop_freq"] - 0.5).abs()).sort_values("margin").head(shown)
    lines = ["## How sure are we (bootstrap over calibration windows)", "",
             f"Pruning {ratio:.0%} of each layer's experts by `{criterion}`"
             + (" (the criterion `moekit prune` uses by default)"
                if criterion == DEFAULT_CRITERION else "")
             + "; these numbers cover that criterion only (`moekit stats uncertainty "
             "--criterion C` for another): an expert is "
             f"*unstable* when resampling the windows flips its keep/drop decision more than "
             f"{UNSTABLE:.0%} of the time. `more_tokens` estimates the extra calibration tokens "
             "after which every decision of the layer would be stable (interval width ~ "
             "1/sqrt(tokens)). `dead` = no token and a 95% upper bound under "
             f"{DEAD_FRACTION:.0%} of the fair share; `unseen` = no token, sample too small to "
             "call it dead.", "",
             markdown_table(layers[["layer", "windows", "unstable", "dead", "unseen",
                                    "more_tokens"]]), ""]
    if len(shaky):
        cols = ["layer", "expert", "share", "share_lo", "share_hi", "drop_freq"]
        lines += ["Least stable decisions (slot share: the share of the layer's routed slots, "
                  "95% interval, how often dropped under resampling):", "",
                  markdown_table(named_share(shaky[cols]), "{:.4f}"), ""]
    else:
        lines += ["Every pruning decision is stable under resampling.", ""]
    return lines
