"""The one engine that runs a checkpoint: in memory, or streamed layer by layer.

    engine = open_model(path, device="auto", dtype="auto", max_memory="auto")
    for index, logits in engine.run(batches, before=..., head=True): ...

`run` takes the caller's list of input-id batches ([B, S] int64; a data-parallel caller
passes its rank's share) and yields `(index, logits or None)` per batch, in order.
`before(index)` is called each time batch `index` is about to run (once per batch in memory,
once per batch per layer when streamed), so hooks can tell which batch they see.

Streamed (`engine.mode == "stream"`), loops are swapped - layers outside, batches inside:
  1. per batch: the embedded input and every layer's call arguments (`layers.capture`);
  2. per layer: weights read once (`weights.WeightMap`), the next layer read in a background
     thread meanwhile, every batch run through it with hooks firing as usual, the hidden
     states overwritten in place (`hidden.HiddenStore`, RAM or a spill file), the layer freed
     (`.to("meta")`, so hooks registered once on the skeleton stay valid);
  3. with `head=True`, per batch the final norm + LM head (the model's own forward, replayed).
A layer larger than the budget is run in expert groups (`groups.py`).

Per-layer access for later commands (merge, quality-aware prune): `on_layer(step)` is called
for each decoder layer once it is materialised and before the batches run through it;
`step.module` is the layer, `step.inputs(b)` batch b's hidden state entering it [B, S, H],
`step.call(b, module)` runs a module as the layer with batch b's arguments (e.g. a candidate
merged layer, to compare outputs). `after_layer(step)` follows once every batch went through
(the place to reduce that layer's statistics across data-parallel ranks). Both work in memory
too (the loop then runs layer by layer without loading anything). To capture a MoE block's
input, register a forward pre-hook on `step.module.mlp` in `on_layer` and remove it in
`after_layer`.

Reductions: the engine keeps no statistics of its own; hooks accumulate into the caller's
Recorder / sums, which a data-parallel caller all-reduces (`moekit.runtime.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.errors import CheckpointError, DataError
from moekit.families.layout import describe
from moekit.formats import is_quantized
from moekit.io.reader import Checkpoint
from moekit.io.remote_code import check_remote_code
from moekit.runtime.budget import HIDDEN_FRACTION, Plan, Sizes, decide, free_memory
from moekit.runtime.caches import bound
from moekit.runtime.groups import mark_grouped, routed_experts, run_grouped, split_experts
from moekit.runtime.hidden import HiddenStore
from moekit.runtime.loading import build_skeleton, load_dtype, load_model, pick_device
from moekit.runtime.weights import WeightMap
from moekit.units import human

Before = Callable[[int], None]


@dataclass
class LayerStep:
    """One decoder layer during a layered run (see the module docstring)."""

    index: int
    module: Any
    store: Any
    calls: list[Any]
    prefix: str = ""

    def inputs(self, batch: int) -> Any:
        return self.store.get(batch)

    def call(self, batch: int, module: Any | None = None) -> Any:
        return self.calls[batch][self.index](module or self.module, self.store.get(batch))


@dataclass
class Engine:
    """A model ready to run (see the module docstring). `model` is the transformers model: in
    memory fully loaded; streamed a meta skeleton with embeddings, norm and head real."""

    path: Path
    model: Any
    device: Any
    dtype: Any
    plan: Plan
    family: Any = None
    weights: Any = None
    spill_dir: str | None = None
    hidden_ram: int | None = None
    sizes: Sizes | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.plan.mode

    def describe(self) -> dict[str, Any]:
        """What ran and why, for metadata files."""
        return {**self.plan.describe(), **self.info}

    def run(self, batches: Sequence[Any], *, before: Before | None = None,
            head: bool | Collection[int] = False,
            on_layer: Callable[[LayerStep], None] | None = None,
            after_layer: Callable[[LayerStep], None] | None = None,
            progress: Callable[[int, float], None] | None = None,
            final: bool = False) -> Iterator[tuple[int, Any]]:
        """Yield (batch index, logits [B, S, V] or None) for every batch, in order.
        `progress(index, fraction)`: that share of batch `index`'s work is done.
        `on_layer` / `after_layer(step)`: layered runs only, before / after the batches pass
        through a layer (e.g. to reduce that layer's statistics across ranks).
        `head`: True for every batch's logits, or the indices of the batches that need them
        (the others yield None). With `final`, those batches yield the last decoder layer's
        output [B, S, H] instead (no B x S x V logits); `logits(ids, final, rows)` turns
        positions of it into logits."""
        self._check_ids(batches)
        if self.mode == "memory" and on_layer is None and after_layer is None and not final:
            return self._whole(batches, before, head, progress)
        return self._layered(batches, before, head, (on_layer, after_layer), progress, final)

    def logits(self, input_ids: Any, final: Any, rows: Any = None) -> Any:
        """Logits [B, r, V] of positions `rows` (1-D index tensor; None: all) of the model
        whose last decoder layer returned `final` [B, S, H] on `input_ids` [B, S]: the model's
        own final norm, LM head and logit scaling (`layers.replay_head`)."""
        import torch

        from moekit.runtime.layers import find_stack, replay_head

        with torch.inference_mode():
            return replay_head(self.model, find_stack(self.model), input_ids.to(self.device),
                               final.to(self.device), rows)

    def _check_ids(self, batches: Sequence[Any]) -> None:
        """Refuse token ids outside the embedding table before any work: on CUDA such an id
        is a device-side assert that poisons the process, on the CPU an IndexError."""
        rows = getattr(self.model.get_input_embeddings(), "num_embeddings", None)
        if rows is None:
            return
        for ids in batches:
            if ids.numel() == 0:
                continue
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= rows:
                raise DataError(f"token id {high if high >= rows else low} is outside this "
                                f"model's vocabulary of {rows} entries",
                                "the tokenizer does not belong to the model: use the model's "
                                "own tokenizer (or pass the right one with --tokenizer)")

    def _whole(self, batches: Sequence[Any], before: Before | None, head: bool | Collection[int],
               progress: Callable[[int, float], None] | None) -> Iterator[tuple[int, Any]]:
        import torch

        for index, ids in enumerate(batches):
            if before is not None:
                before(index)
            out = None
            with torch.inference_mode():
                if head is True or (head and index in head):
                    out = self.model(input_ids=ids.to(self.device), use_cache=False).logits
                else:
                    forward_routing(self.model, ids.to(self.device))
            if progress is not None:
                progress(index, 1.0)
            yield index, out

    def _layered(self, batches: Sequence[Any], before: Before | None,
                 head: bool | Collection[int],
                 callbacks: tuple[Callable[[LayerStep], None] | None, ...],
                 progress: Callable[[int, float], None] | None,
                 final: bool = False) -> Iterator[tuple[int, Any]]:
        import torch

        from moekit.runtime.layers import capture, find_stack, replay_head

        stack = find_stack(self.model)
        if head and self.mode == "stream" and self.model.get_output_embeddings().weight.is_meta:
            _materialise_outside_layers(self.model, self.weights, self.device, head=True)
        spill, offload = self._placement(batches)
        store = HiddenStore(self.device, spill, self.spill_dir, offload)
        self.info["hidden_states"] = "spilled to a temporary file" if spill else \
            "host RAM" if offload else "RAM" if self.device.type == "cpu" else "device memory"
        try:
            calls = []
            with torch.inference_mode():
                for index, ids in enumerate(batches):
                    if before is not None:
                        before(index)
                    hidden, per_layer = capture(stack, ids.to(self.device))
                    store.put(index, hidden)
                    calls.append(per_layer)
                for index, layer in self._layers(stack):
                    step = LayerStep(index, layer, store, calls, stack.prefix(index))
                    if callbacks[0] is not None:
                        callbacks[0](step)
                    self._run_layer(step, before, progress, len(stack.layers))
                    if callbacks[1] is not None:
                        callbacks[1](step)
            for index, ids in enumerate(batches):
                if not (head is True or (head and index in head)):
                    yield index, None
                    continue
                if final:
                    yield index, store.get(index)
                    continue
                with torch.inference_mode():
                    logits = replay_head(self.model, stack, ids.to(self.device), store.get(index))
                yield index, logits
        finally:
            store.close()

    def _run_layer(self, step: LayerStep, before: Before | None,
                   progress: Callable[[int, float], None] | None, num_layers: int) -> None:
        if getattr(step.module, "_moekit_groups", None):
            run_grouped(self, step, before, progress, num_layers)
            return
        for index in range(len(step.calls)):
            if before is not None:
                before(index)
            step.store.put(index, step.call(index))
            if progress is not None:
                progress(index, 1.0 / num_layers)

    def _layers(self, stack: Any) -> Iterator[tuple[int, Any]]:
        """Each layer materialised in turn (streamed: read, next one prefetched, then freed)."""
        if self.mode == "memory":
            yield from enumerate(stack.layers)
            return

        count = len(stack.layers)
        pool = ThreadPoolExecutor(1, thread_name_prefix="moekit-prefetch") \
            if self.plan.prefetch else None

        def names(i: int) -> list[str]:
            prefix = stack.prefix(i)
            return [t.name for t in self.weights.under(prefix)
                    if not split_experts(self, stack.layers[i], t.name, prefix)]

        def load(i: int) -> dict[str, Any]:
            return self.weights.read(names(i), self.device, strip=stack.prefix(i))

        pending = pool.submit(load, 0) if pool else None
        try:
            for i, layer in enumerate(stack.layers):
                state = pending.result() if pending is not None else load(i)
                if pool is not None and i + 1 < count:
                    pending = pool.submit(load, i + 1)
                elif i + 1 < count:  # no room for a second layer: prefetch into the page cache
                    self.weights.advise(names(i + 1))
                layer.load_state_dict(state, strict=False, assign=True)
                del state
                try:
                    _check_loaded(layer, i)
                    yield i, layer
                finally:  # also when the run stops early: the layer's memory is given back
                    layer.to("meta")
                    trim_heap()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _placement(self, batches: Sequence[Any]) -> tuple[bool, bool]:
        """(spill, offload) for the hidden states, sum of B x S x H x itemsize over batches:
        on the compute device while under HIDDEN_FRACTION of its free memory (CUDA), else in
        host RAM while under `hidden_ram` (default: HIDDEN_FRACTION of the free RAM), else in a
        file (`runtime.budget`)."""
        hidden = int(self.model.config.get_text_config().hidden_size)
        need = sum(int(b.numel()) for b in batches) * hidden * self.dtype.itemsize
        allowance = self.hidden_ram if self.hidden_ram is not None else \
            HIDDEN_FRACTION * free_memory("cpu")
        self.info["hidden_bytes"] = need
        if need > allowance:
            return True, False
        return False, self.device.type != "cpu" and need > HIDDEN_FRACTION * free_memory(
            self.device)


def forward_routing(model: Any, input_ids: Any) -> Any:
    """One forward pass as profiling runs it: no KV cache, logits for the last position only
    (the routing of every position is computed either way)."""
    return model(input_ids=input_ids, use_cache=False, logits_to_keep=1)


def open_model(path: Path, *, device: str = "auto", dtype: str = "auto",
               max_memory: str | int | None = "auto", stream: bool | None = None,
               hidden_ram: int | None = None, spill_dir: str | None = None,
               trust_remote_code: bool = False) -> Engine:
    """Decide memory or streaming (`moekit.runtime.budget`) and prepare the model.
    `stream` forces the choice; `hidden_ram` caps the RAM for hidden states (bytes).
    Code shipped in the checkpoint runs only with `trust_remote_code`."""
    bound()  # before the first matmul: oneDNN's shape caches would grow per layer otherwise
    target = pick_device(device)
    checkpoint = Checkpoint(Path(path))
    layout = describe(checkpoint)
    family = layout.family if layout.is_moe else None
    skeleton = build_skeleton(Path(path), load_dtype(_config(path, trust_remote_code), dtype,
                                                     checkpoint, target), trust_remote_code)
    weights = WeightMap(checkpoint, skeleton)
    needs = sizes(weights, skeleton, family)
    plan = decide(needs, max_memory, target, stream)
    torch_dtype = skeleton.dtype
    if plan.mode == "memory" and is_quantized(checkpoint):
        return Engine(Path(path), _materialise_whole(skeleton, weights, target), target,
                      torch_dtype, plan, family, info={"dequantized": True})
    if plan.mode == "memory":
        del skeleton, weights
        model = load_model(Path(path), str(target), dtype, trust_remote_code)
        return Engine(Path(path), model, target, torch_dtype, plan, family)
    _materialise_outside_layers(skeleton, weights, target, head=False)
    engine = Engine(Path(path), skeleton, target, torch_dtype, plan, family, weights, spill_dir,
                    hidden_ram, needs, {"largest_layer_bytes": max(needs.layers, default=0),
                                        "resident_bytes": needs.resident})

    mark_grouped(engine)
    return engine


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`): without it, the small
    tensors of each freed layer leave 15-80 MB of retained heap per layer in the RSS."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to do
        pass


def _check_loaded(layer: Any, index: int) -> None:
    """Every tensor of a loaded layer is real (expert-group tensors excepted)."""
    grouped = getattr(layer, "_moekit_groups", None)
    left = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()]
            if t.is_meta and not (grouped and n.startswith(grouped[0] + "."))]
    if left:
        raise CheckpointError(f"layer {index}: the checkpoint lacks {', '.join(left[:4])}",
                              "the weights do not match the config")


def _config(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    check_remote_code(path, trust_remote_code)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def sizes(weights: Any, model: Any, family: Any) -> Sizes:
    """Bytes of the whole model, of what stays resident, and per layer (load dtype)."""
    from moekit.runtime.layers import find_stack

    stack = find_stack(model)
    used = {n: t for n, t in weights.targets.items()
            if not n.startswith(stack.name + ".") or _layer_of(n, stack) < len(stack.layers)}
    layers, bases, expert = [], [], []
    for i, layer in enumerate(stack.layers):
        prefix = stack.prefix(i)
        total = weights.nbytes(prefix)
        routed, count = routed_experts(layer, family)
        base = weights.nbytes(prefix, prefix + routed + ".") if routed else total
        layers.append(total)
        bases.append(base)
        expert.append((total - base) // count if routed else 0)
    resident = sum(t.nbytes() for n, t in used.items() if not n.startswith(stack.name + "."))
    return Sizes(sum(t.nbytes() for t in used.values()), resident, tuple(layers), tuple(bases),
                 tuple(expert))


def _layer_of(name: str, stack: Any) -> int:
    return int(name[len(stack.name) + 1:].split(".", 1)[0])


def _materialise_whole(model: Any, weights: Any, device: Any) -> Any:
    """The skeleton `model` with every weight read (quantized ones dequantized to the load
    dtype by `weights`), as `from_pretrained` would give it for the unquantized checkpoint."""
    from moekit.runtime.layers import find_stack

    _materialise_outside_layers(model, weights, device, head=True)
    stack = find_stack(model)
    inside = [n for n in weights.targets if n.startswith(stack.name + ".")]
    model.load_state_dict(weights.read(inside, device), strict=False, assign=True)
    for index in range(len(stack.layers)):
        _check_loaded(stack.layers[index], index)
    return model


def _materialise_outside_layers(model: Any, weights: Any, device: Any, head: bool) -> None:
    """Read embeddings and final norm (and with `head` the LM head, else it stays on meta
    until a run asks for logits); rebuild rotary embeddings (computed buffers); tie the LM head
    to the embeddings when the checkpoint has none."""
    from moekit.runtime.layers import find_stack

    stack = find_stack(model)
    skip = (stack.name + ".",) + (() if head else (_head_prefix(model),))
    outside = [n for n in weights.targets if not n.startswith(skip)]
    _computed_buffers(model, stack.name + ".", device)
    model.load_state_dict(weights.read(outside, device), strict=False, assign=True)
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb") and not name.startswith(stack.name + "."):
            _rebuild(model, name, module, device)
    lm_head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if lm_head is not None and lm_head.weight.is_meta and not embed.weight.is_meta and \
            not any(n.startswith(_head_prefix(model)) for n in weights.targets):
        lm_head.weight = embed.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta and not n.startswith(skip)]
    if left:
        raise CheckpointError(f"the checkpoint lacks {', '.join(left[:4])}",
                              "the weights do not match the config")


def _computed_buffers(model: Any, inside: str, device: Any) -> None:
    """Non-persistent buffers outside the layers (e.g. Gemma's `embed_scale`) are not in the
    checkpoint: allocate them and let the model's `_init_weights` fill them, as transformers'
    loader does (the module's parameters are still on meta, so nothing else is touched)."""
    import torch

    named = getattr(model, "named_non_persistent_buffers", None)
    owners = {}
    for key, buffer in (named() if named else ()):
        if key.startswith(inside) or not buffer.is_meta or ".rotary_emb." in f".{key}":
            continue
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        module._buffers[attr] = torch.empty_like(buffer, device=device)
        owners[module_name] = module
    with torch.no_grad():
        for module in owners.values():
            model._init_weights(module)


def _head_prefix(model: Any) -> str:
    lm_head = model.get_output_embeddings()
    return next(n for n, m in model.named_modules() if m is lm_head) + "."


def _rebuild(model: Any, name: str, module: Any, device: Any) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    config = getattr(module, "config", None) or parent.config
    try:
        fresh = type(module)(config=config, device=device)
    except TypeError:
        fresh = type(module)(config=config).to(device)
    setattr(parent, attr, fresh)


def mode_line(engine: Engine) -> str:
    """One line for the terminal: which mode ran and why."""
    plan = engine.plan
    budget = f" (budget {human(plan.budget)})" if plan.budget and plan.mode == "stream" else ""
    return f"{'streamed layer by layer' if plan.mode == 'stream' else 'in memory'}{budget}: " \
           f"{plan.reason}"
