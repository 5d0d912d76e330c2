"""Provenance record and model card of a converted checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.io.card import provenance, write_model_card, write_provenance


def write_convert_records(folder: Path, source: str, summary: dict[str, Any],
                          request: dict[str, Any], source_folder: Path | None = None) -> None:
    """Write `moekit_provenance.json` and `README.md` into `folder`; `summary`: the plan's
    (`ConvertPlan.summary`), `request`: dtype, experts, quantize, scope as given to
    `convert_checkpoint`."""
    write_provenance(folder, provenance("convert", source, **request, **summary))
    name = Path(source).name if Path(source).exists() else source
    what = ", ".join(x for x in (
        request.get("dtype") and f"dtype {request['dtype']}",
        request.get("quantize") and f"{request['quantize']} {request.get('scope')} layers",
        request.get("experts") and f"experts {request['experts']}") if x)
    actions = ", ".join(f"{n} {a}" for a, n in summary["actions"].items())
    text = (f"`{name}` converted ({what}): {summary['tensors_in']} stored tensors in, "
            f"{summary['tensors_out']} out ({actions}). Values are unchanged up to the cast to "
            "the new dtype or the FP8-block / MXFP4 rounding; quantized tensors were decoded "
            "as their format specifies.")
    body = "## Config changes\n\n" + "\n".join(
        f"- {c}" for c in summary["config_changes"] or ["none"]) + "\n"
    write_model_card(folder, base_model=source, title=f"{Path(name).name} ({what})",
                     summary=text, tags=["converted"], body=body,
                     source_card=(source_folder / "README.md") if source_folder else None)
