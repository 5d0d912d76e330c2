"""Provenance record and model card of a converted checkpoint."""

from __future__ import annotations

from pathlib import Path

from moekit.io.card import provenance, write_model_card, write_provenance
from moekit.ops.convert.run import ConvertPlan


def write_convert_records(folder: Path, source: str, plan: ConvertPlan, *, dtype: str | None,
                          experts: str | None, source_folder: Path | None = None) -> None:
    """Write `moekit_provenance.json` and `README.md` into `folder`."""
    write_provenance(folder, provenance("convert", source, dtype=dtype, experts=experts,
                                        **plan.summary()))
    name = Path(source).name if Path(source).exists() else source
    what = ", ".join(x for x in (dtype and f"dtype {dtype}",
                                 experts and f"experts {experts}") if x)
    actions = ", ".join(f"{n} {a}" for a, n in plan.actions.items())
    summary = (f"`{name}` converted ({what}): {plan.inputs} stored tensors in, "
               f"{len(plan.tensors)} out ({actions}). Values are unchanged up to the cast to "
               "the new dtype; quantized tensors were decoded as their format specifies.")
    body = "## Config changes\n\n" + "\n".join(
        f"- {c}" for c in plan.config_changes or ["none"]) + "\n"
    write_model_card(folder, base_model=source, title=f"{Path(name).name} ({what})",
                     summary=summary, tags=["converted"], body=body,
                     source_card=(source_folder / "README.md") if source_folder else None)
