"""PNG plots of a profile (matplotlib, Agg backend): usage heatmap, per-domain specialisation,
co-activation of one layer, sorted load curves. Colour scales centre on 1 = the uniform share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.stats.metrics import conditional_coactivation, expert_table, specialisation

if TYPE_CHECKING:
    import numpy as np

    from moekit.stats.profile import Profile

DPI = 110
MAX_PANELS = 4
ANNOTATE_MAX_EXPERTS = 16
MIN_COACT_TOKENS = 30  # co-activation rows of experts with fewer routed tokens are masked


def write_plots(profile: Profile, folder: Path, plot_layer: int | None = None) -> dict[str, str]:
    """Write every plot into `folder`; returns {kind: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    layer = plot_layer if plot_layer is not None else _busiest_layer(profile)
    files = {"usage": "usage_heatmap.png", "load_curves": "load_curves.png",
             "coactivation": f"coactivation_layer{layer}.png"}
    usage_heatmap(profile, Path(folder) / files["usage"])
    load_curves(profile, Path(folder) / files["load_curves"])
    coactivation_plot(profile, Path(folder) / files["coactivation"], layer)
    if profile.domains:
        files["specialisation"] = "specialisation.png"
        specialisation_plot(profile, Path(folder) / files["specialisation"],
                            panel_layers(profile, plot_layer))
    return files


def _busiest_layer(profile: Profile) -> int:
    """The MoE layer with the highest MaxVio (the most uneven routing)."""
    layers = profile.layer_stats
    rows = layers[layers["domain"] == "all"].fillna({"maxvio": -1})
    return int(rows.sort_values("maxvio", ascending=False)["layer"].iloc[0])


def panel_layers(profile: Profile, plot_layer: int | None = None) -> list[int]:
    """Up to MAX_PANELS MoE layers spread from first to last, plus `plot_layer`."""
    layers = profile.moe_layers
    if len(layers) <= MAX_PANELS:
        chosen = list(layers)
    else:
        step = (len(layers) - 1) / (MAX_PANELS - 1)
        chosen = [layers[round(i * step)] for i in range(MAX_PANELS)]
    if plot_layer is not None and plot_layer not in chosen:
        chosen = sorted([*chosen[:MAX_PANELS - 1], plot_layer])
    return chosen


def _norm(vmax: float) -> Any:
    from matplotlib.colors import TwoSlopeNorm

    return TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(vmax)))


def _title(profile: Profile) -> str:
    return Path(str(profile.metadata.get("model", "model"))).name


def _expert_ticks(ax: Any, num_experts: int) -> None:
    step = max(1, num_experts // 32)
    ax.set_xticks(range(0, num_experts, step))
    ax.set_xticklabels([str(i) for i in range(0, num_experts, step)], fontsize=8)


def cell_label(value: float) -> str:
    """One decimal, but a positive value that would read 0.0 keeps one significant digit
    (0.04, 3e-05): a used expert never looks dead."""
    text = f"{value:.1f}"
    return f"{value:.1g}" if value > 0 and float(text) == 0 else text


def _annotate(ax: Any, image: Any, values: np.ndarray, dead: np.ndarray | None = None) -> bool:
    """Write each cell's value (white on dark cells, black on light ones; `dead` cells get a
    cross). Returns False when the grid is too large to annotate."""
    rows, cols = values.shape
    if cols > ANNOTATE_MAX_EXPERTS or rows > 24:
        return False
    for i in range(rows):
        for j in range(cols):
            value = values[i, j]
            if value != value:  # NaN
                continue
            red, green, blue, _ = image.cmap(image.norm(value))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.55
            is_dead = dead is not None and dead[i, j]
            ax.text(j, i, "\u00d7" if is_dead else cell_label(value), ha="center",
                    va="center", fontsize=11 if is_dead else 7,
                    color="white" if dark else "black")
    return True


def usage_heatmap(profile: Profile, path: Path) -> None:
    """Layer x expert heatmap of the relative load r_e over all domains; experts that got no
    token are marked x."""
    import matplotlib.pyplot as plt
    import numpy as np

    table = expert_table(profile)
    grid = table.pivot(index="layer", columns="expert", values="relative_load").fillna(0.0)
    values = grid.to_numpy()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * values.shape[1] + 2.5),
                                    max(2.5, 0.5 * values.shape[0] + 1.6)), dpi=DPI)
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=_norm(values.max()))
    dead = values == 0
    if not _annotate(ax, image, values, dead) and dead.any():
        cells = np.argwhere(dead)
        ax.scatter(cells[:, 1], cells[:, 0], marker="x", color="white", s=12)
    ax.set_yticks(range(len(grid.index)))
    ax.set_yticklabels([str(i) for i in grid.index])
    _expert_ticks(ax, values.shape[1])
    ax.set_xlabel("expert    (\u00d7 = no token routed to it)")
    ax.set_ylabel("MoE layer")
    tokens = int(profile.layer_stats.query("domain == 'all'")["tokens"].max())
    ax.set_title(f"Expert usage: {_title(profile)}, all domains ({tokens:,} tokens)")
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("relative load  L_e / (S/E)\n1 = uniform share")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def specialisation_plot(profile: Profile, path: Path, layers: list[int]) -> None:
    """One panel per layer: domain x expert heatmap of share_{e,D} / (1/E) (slot shares)."""
    import matplotlib.pyplot as plt

    frame = specialisation(profile)
    domains = profile.domains
    tokens = {name: int(info["tokens"]) for name, info in profile.metadata["domains"].items()}
    grids = [frame[frame["layer"] == layer].pivot(index="domain", columns="expert",
                                                  values="relative").reindex(domains).fillna(0.0)
             for layer in layers]
    vmax = max(float(g.to_numpy().max()) for g in grids)
    num_experts = grids[0].shape[1]
    fig, axes = plt.subplots(len(layers), 1, squeeze=False, dpi=DPI, layout="constrained",
                             figsize=(max(7.0, 0.5 * num_experts + 3.5),
                                      0.4 * len(domains) * len(layers) + 0.7 * len(layers) + 1))
    image = None
    for ax, layer, grid in zip(axes[:, 0], layers, grids, strict=True):
        values = grid.to_numpy()
        image = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=_norm(vmax))
        _annotate(ax, image, values)
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels([f"{d} ({_short(tokens.get(d, 0))} tok)" for d in domains],
                           fontsize=8)
        _expert_ticks(ax, values.shape[1])
        ax.set_title(f"layer {layer}", fontsize=10, loc="left")
    axes[-1, 0].set_xlabel("expert")
    span = profile.metadata.get("data_range", "0:1")
    fig.suptitle(f"Domain specialisation: {_title(profile)} (data range {span} of each source)\n"
                 "slot share: the expert's share of each domain's routed slots / uniform 1/E",
                 fontsize=11)
    bar = fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.01, aspect=40)
    bar.set_label("slot share / (1/E)   (1 = uniform, >1 = preferred)")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _short(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def coactivation_values(counts: np.ndarray) -> np.ndarray:
    """P(j | i) = N(i, j) / N(i) [E, E] float, NaN on the diagonal and in the rows of experts
    with N(i) < MIN_COACT_TOKENS (a ratio over a handful of tokens is noise: 1 of 1 = 1.0)."""
    import numpy as np

    values = conditional_coactivation(counts)
    np.fill_diagonal(values, np.nan)
    values[np.diag(counts) < MIN_COACT_TOKENS, :] = np.nan
    return values


def coactivation_plot(profile: Profile, path: Path, layer: int) -> None:
    """E x E heatmap of P(j chosen | i chosen) = N(i, j) / N(i) for one layer (all domains)."""
    import matplotlib.pyplot as plt
    import numpy as np

    counts = profile.coact(layer)
    num_experts = counts.shape[0]
    values = coactivation_values(counts)
    seen = np.diag(counts)
    top_k = profile.layer_stats.query("domain == 'all' and layer == @layer")["top_k"].iloc[0]
    base = (top_k - 1) / (num_experts - 1) if num_experts > 1 else 0.0
    size = max(5.0, 0.38 * num_experts + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size), dpi=DPI)
    cmap = plt.get_cmap("magma_r").with_extremes(bad="#dddddd")
    image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=max(float(np.nanmax(values)), 1e-9))
    if num_experts <= ANNOTATE_MAX_EXPERTS:
        for i in range(num_experts):
            for j in range(num_experts):
                if i != j and values[i, j] >= 0.005:
                    ax.text(j, i, f"{values[i, j]:.2f}"[1:] if values[i, j] < 1 else "1",
                            ha="center", va="center", fontsize=6,
                            color="white" if values[i, j] > 0.6 * np.nanmax(values) else "black")
    _expert_ticks(ax, num_experts)
    rows = range(0, num_experts, max(1, num_experts // 32))
    ax.set_yticks(rows)
    ax.set_yticklabels([f"{i} (N={_short(int(seen[i]))})" for i in rows], fontsize=7)
    ax.set_xlabel("expert j")
    ax.set_ylabel("expert i (N(i) = tokens routed to i)")
    ax.set_title(f"Co-activation, layer {layer}: {_title(profile)}\n"
                 f"P(j also chosen | i chosen); uniform random routing: {base:.3f}; grey rows: "
                 f"N(i) < {MIN_COACT_TOKENS}", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("N(i, j) / N(i)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def load_curves(profile: Profile, path: Path) -> None:
    """Per layer, the relative loads sorted from busiest to idlest expert."""
    import matplotlib.pyplot as plt
    import numpy as np

    table = expert_table(profile)
    layers = profile.moe_layers
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=DPI)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(layers)))
    for colour, layer in zip(colours, layers, strict=True):
        loads = np.sort(table[table["layer"] == layer]["relative_load"].fillna(0).to_numpy())[::-1]
        ax.plot(np.arange(1, loads.size + 1), loads, marker="o" if loads.size <= 64 else None,
                markersize=3, color=colour, label=f"layer {layer}")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="uniform (1)")
    ax.set_xlabel("experts ranked by load (1 = busiest)")
    ax.set_ylabel("relative load  L_e / (S/E)")
    ax.set_title(f"Sorted expert load per layer: {_title(profile)}, all domains")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(layers) <= 12:
        ax.legend(fontsize=8, ncol=2)
    else:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        mappable = ScalarMappable(Normalize(layers[0], layers[-1]), plt.get_cmap("viridis"))
        fig.colorbar(mappable, ax=ax).set_label("MoE layer")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
