"""Target choice and config.json for `moekit upcycle`: which MoE family a dense model becomes,
and the target config built from the dense one (same keys, MoE keys added)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

from moekit.errors import InvalidArgumentError, MoekitError, UnsupportedModelError
from moekit.families.registry import MOE_FAMILIES, by_name
from moekit.families.spec import DenseFamily, MoeFamily

# Dense config keys a target cannot express when they are truthy: refuse rather than drop them.
UNREPRESENTABLE = ("attention_bias", "mlp_bias")


@dataclass(frozen=True)
class TargetKeys:
    """Config keys of a target beyond its family record (checked against transformers'
    config classes in the tests). `extras`: written with EXTRA_VALUES; `attention_bias`: the
    key switching q/k/v biases on (None: the target has no attention biases)."""

    extras: tuple[str, ...]
    attention_bias: str | None


EXTRA_VALUES: dict[str, Any] = {"decoder_sparse_step": 1, "mlp_only_layers": [],
                                "output_router_logits": False, "router_jitter_noise": 0.0}
_QWEN_EXTRAS = ("decoder_sparse_step", "mlp_only_layers", "output_router_logits",
                "router_aux_loss_coef")
TARGETS: dict[str, TargetKeys] = {
    "mixtral": TargetKeys(("output_router_logits", "router_aux_loss_coef",
                           "router_jitter_noise"), None),
    "qwen2_moe": TargetKeys(_QWEN_EXTRAS, "qkv_bias"),
    "qwen3_moe": TargetKeys(_QWEN_EXTRAS, "attention_bias"),
}


def candidates(dense: DenseFamily) -> list[MoeFamily]:
    """MoE families whose records declare `dense` as an upcycling source (same attention)."""
    return [f for f in MOE_FAMILIES if dense.name in f.dense_source
            and f.attention == dense.attention and f.name in TARGETS]


def resolve_target(dense: DenseFamily, arch: str | None) -> MoeFamily:
    """The target family for `--arch` (or the only candidate when `arch` is None)."""
    valid = candidates(dense)
    names = ", ".join(f.name for f in valid) or "none"
    if not valid:
        raise UnsupportedModelError(f"no MoE family can take {dense.name}'s weights",
                                    "upcycle supports llama, mistral, qwen2 and qwen3 sources")
    if arch is None:
        if len(valid) > 1:
            raise InvalidArgumentError(f"{dense.name} can become {names}", "pass --arch")
        return valid[0]
    try:
        family = by_name(arch)
    except UnsupportedModelError:
        raise InvalidArgumentError(f"unknown --arch '{arch}'",
                                   f"valid targets for {dense.name}: {names}") from None
    if not isinstance(family, MoeFamily):
        raise InvalidArgumentError(f"--arch {arch} is a dense family",
                                   f"valid targets for {dense.name}: {names}")
    if family not in valid:
        why = (f"{family.name} uses {family.attention} attention, {dense.name} uses "
               f"{dense.attention}" if family.attention != dense.attention
               else f"{family.name}'s attention and layer layout differ from {dense.name}'s")
        raise InvalidArgumentError(f"cannot upcycle {dense.name} into {family.name}: {why}",
                                   f"valid targets for {dense.name}: {names}")
    return family


@dataclass(frozen=True)
class MoeShape:
    """The MoE numbers written into the target config."""

    experts: int
    top_k: int
    expert_width: int
    shared_width: int | None
    norm_topk_prob: bool
    aux_loss_coef: float
    qkv_bias: bool


def build_config(dense_config: dict[str, Any], family: MoeFamily,
                 shape: MoeShape) -> dict[str, Any]:
    """The target config.json: every dense key in its order (legacy spellings such as a
    top-level `rope_theta` included, so other tools still read them), then
    `model_type`/`architectures` and the MoE keys named by the family record.

    Raises when a dense feature (attention or MLP biases) has no place in the target.
    """
    target = TARGETS[family.name]
    for key in UNREPRESENTABLE:
        if dense_config.get(key) and key != target.attention_bias:
            raise InvalidArgumentError(
                f"the dense config sets {key}=true, which {family.name} cannot represent",
                "choose another target or a checkpoint without those biases")
    config = dict(dense_config)
    config["architectures"] = [family.architectures[0]]
    config["model_type"] = family.model_types[0]
    keys = family.keys
    moe: dict[str, Any] = {keys.num_experts[0]: shape.experts, keys.top_k[0]: shape.top_k,
                           keys.expert_width[0]: shape.expert_width}
    if keys.shared_width and shape.shared_width is not None:
        moe[keys.shared_width[0]] = shape.shared_width
    if family.router.renorm == "config":
        moe[keys.renorm[0]] = shape.norm_topk_prob
    values = {**EXTRA_VALUES, "router_aux_loss_coef": shape.aux_loss_coef}
    moe.update({key: values[key] for key in target.extras})
    if target.attention_bias and target.attention_bias not in config:
        moe[target.attention_bias] = shape.qkv_bias
    config.update(moe)
    return config


def validate_config(config: dict[str, Any], family: MoeFamily, shape: MoeShape) -> None:
    """Build the transformers config class from `config` (AutoConfig.for_model) and check it
    reads back the MoE numbers (catches a key the class ignores or renames)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    try:
        parsed = AutoConfig.for_model(family.model_types[0], **fields)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(f"the {family.name} config built from the dense config is "
                                   f"invalid: {err}") from err
    seen = (getattr(parsed, family.keys.num_experts[0]), getattr(parsed, family.keys.top_k[0]),
            getattr(parsed, family.keys.expert_width[0]))
    want = (shape.experts, shape.top_k, shape.expert_width)
    if seen != want:
        raise InvalidArgumentError(f"transformers reads experts/top-k/width {seen} from the "
                                   f"written {family.name} config, expected {want}")


def start_validation(config: dict[str, Any], family: MoeFamily, shape: MoeShape,
                     in_process: bool | None = None) -> subprocess.Popen[bytes] | None:
    """`validate_config` in a child process, so importing transformers (seconds) overlaps
    the tensor writing; collect the verdict with `finish_validation`. When transformers is
    already imported (calibration ran, or a library caller) it runs here and returns None
    (`in_process` forces either way)."""
    if in_process if in_process is not None else "transformers" in sys.modules:
        validate_config(config, family, shape)
        return None
    job = {"config": config, "family": family.name, "shape": asdict(shape)}
    proc = subprocess.Popen([sys.executable, "-m", "moekit.ops.upcycle.config"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(job).encode())
    proc.stdin.close()
    return proc


def finish_validation(proc: subprocess.Popen[bytes] | None) -> None:
    """Wait for the child; raise its one-line error when the config is invalid."""
    if proc is None:
        return
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if proc.wait() != 0:
        lines = (out.strip() or err.strip() or "no output").splitlines()
        raise InvalidArgumentError(lines[-1])


def _validate_stdin() -> None:
    job = json.loads(sys.stdin.read())
    family = by_name(job["family"])
    assert isinstance(family, MoeFamily)
    try:
        validate_config(job["config"], family, MoeShape(**job["shape"]))
    except MoekitError as err:
        print(str(err))
        sys.exit(1)


if __name__ == "__main__":
    _validate_stdin()
