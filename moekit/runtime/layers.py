"""The decoder stack of a transformers causal LM, and its per-layer call arguments.

Each decoder layer is called by the model's own forward as
`layer(hidden_states, attention_mask=<mask of its type>, position_ids, position_embeddings,
...)`. To run layers one at a time with exactly those arguments, every layer is swapped for a
`_Stub` and the decoder is run on the batch (embedding, rotary, masks only): stub i records its
arguments and passes the hidden state on; the last one stops the forward. Taking layer 0's
arguments for every layer would be wrong where layers differ (sliding/full, chunked, linear
attention). `cache` is dropped and `use_cache=False` forced, so no KV cache grows.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moekit.errors import UnsupportedModelError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

DROPPED = ("cache", "past_key_values", "past_key_value")


@dataclass(frozen=True)
class Stack:
    """The decoder (`model.model`), its layer list and that list's module name."""

    decoder: Any
    layers: Any
    name: str

    def prefix(self, index: int) -> str:
        return f"{self.name}.{index}."


def find_stack(model: Any) -> Stack:
    decoder = model.get_decoder()
    if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        # get_decoder() returns the whole model for some classes (Llama-4 text): take the
        # module that owns the largest `layers` list
        owners = [(len(m.layers), m) for _, m in model.named_modules()
                  if isinstance(getattr(m, "layers", None), torch.nn.ModuleList)]
        decoder = max(owners, key=lambda pair: pair[0])[1] if owners else decoder
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{type(decoder).__name__} has no `layers` list",
                                    "this model cannot be run layer by layer")
    name = next(n for n, m in model.named_modules() if m is layers)
    return Stack(decoder, layers, name)


class _Stop(Exception):
    """Raised by the last stub: the rest of the forward is not needed."""


class _Stub(torch.nn.Module):
    """Stands in for layer `index`: `on_call(index, hidden, args, kwargs)` returns the hidden
    state passed on. Attributes of the real layer stay readable (`attention_type`, ...)."""

    def __init__(self, layer: Any, index: int, on_call: Callable[..., Any], last: bool):
        super().__init__()
        self.__dict__.update(_layer=layer, _index=index, _on_call=on_call, _last=last)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in DROPPED}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        out = self._on_call(self._index, hidden, args[1:], kwargs)
        if self._last and out is None:
            raise _Stop
        return out


@contextmanager
def stubbed(stack: Stack, on_call: Callable[..., Any]) -> Iterator[None]:
    """Swap every layer for a `_Stub` (plain list assignment keeps the real modules, their
    hooks and parameters untouched) and put them back afterwards."""
    real = list(stack.layers)
    modules = stack.layers._modules
    keys = list(modules)
    try:
        for i, key in enumerate(keys):
            modules[key] = _Stub(real[i], i, on_call, i == len(keys) - 1)
        yield
    finally:
        for i, key in enumerate(keys):
            modules[key] = real[i]


@dataclass
class LayerCall:
    """The arguments the model passes to one layer (no hidden state)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def __call__(self, layer: Any, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


def capture(stack: Stack, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
    """The embedded input of layer 0 and every layer's call arguments for one batch."""
    calls: list[LayerCall] = []
    first: list[torch.Tensor] = []

    def on_call(index: int, hidden: Any, args: tuple, kwargs: dict) -> Any:
        if index == 0:
            first.append(hidden)
        calls.append(LayerCall(args, kwargs))
        return None if index == len(stack.layers) - 1 else hidden

    with stubbed(stack, on_call):
        try:
            stack.decoder(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
    if len(calls) != len(stack.layers) or not first:
        raise UnsupportedModelError(f"{type(stack.decoder).__name__} called {len(calls)} of "
                                    f"{len(stack.layers)} layers", "run it in memory")
    return first[0], calls


def replay_head(model: Any, stack: Stack, input_ids: torch.Tensor,
                final: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the full model whose last layer output is `final`: the model's own forward
    runs with identity stubs, the last one returning `final` (so the final norm, LM head and
    any logit scaling or soft-capping are the model's). `rows` (1-D positions) limits the LM
    head to those positions (`logits_to_keep`): [B, len(rows), V]."""
    last = len(stack.layers) - 1

    def on_call(index: int, hidden: Any, args: tuple, kwargs: dict) -> Any:
        return final if index == last else hidden

    keep = {} if rows is None else {"logits_to_keep": rows.to(input_ids.device)}
    with stubbed(stack, on_call):
        return model(input_ids=input_ids, use_cache=False, **keep).logits
