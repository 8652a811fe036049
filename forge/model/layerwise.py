"""A model run one decoder layer at a time, its weights read from safetensors files as each block runs.

``empty_model`` builds the model's module tree from config.json with every parameter on the meta device (no bytes;
buffers such as the rotary frequencies are real), so the model's own forward computes masks, positions and caches.
``streamed`` then hooks each block (every decoder layer, and each other module holding weights: the embeddings,
the final norm, the output head): just before the block runs its parameters are read from a ``source`` (tensor
name -> tensor) into new tensors, and as soon as it returns they are put back on the meta device. At most one
block's weights are resident at a time (the largest: a decoder layer or the embedding matrix), whatever the size
of the model, and the reads are copies: no file stays mapped, so nothing of the checkpoint counts in the RSS
once a block is done.

A model run this way costs one read of its weights per forward pass (a greedy decode of n tokens reads them n
times; a teacher-forced pass once), from the page cache where the files fit it, else from disk.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from forge.core.errors import StepError

if TYPE_CHECKING:
    import torch

__all__ = ["empty_model", "streamed", "blocks", "parameter_names"]

Source = Callable[[str], "torch.Tensor | None"]   # a tensor's name -> the tensor (a copy), or None when absent


def empty_model(directory: Path, dtype):
    """The causal LM of ``directory``'s config.json with its parameters on the meta device, in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _layers(model):
    """The decoder's layer list: the model's ModuleList with num_hidden_layers entries."""
    import torch

    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    raise StepError(f"{type(model).__name__}: no list of {count} decoder layers found to run it layer by layer")


def blocks(model) -> list[tuple[str, object]]:
    """(name, module) of every unit loaded at once: each decoder layer, then every other module that holds
    parameters of its own (embeddings, norms, output head), in the model's order."""
    layers_name, layers = _layers(model)
    out = [(f"{layers_name}.{i}", layer) for i, layer in enumerate(layers)]
    inside = layers_name + "."
    for name, module in model.named_modules():
        if name != layers_name and not name.startswith(inside) and any(True for _ in module.parameters(recurse=False)):
            out.append((name, module))
    return out


def parameter_names(model) -> dict[str, tuple[str, ...]]:
    """Each parameter's name -> every name it goes by, its own first (tied weights: the output head's is the
    embeddings'). transformers 5 ties weights when it loads them, so a meta model shares no parameter: its
    ``all_tied_weights_keys`` (tied name -> source name, empty when the config ties nothing) says which."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    out = {name: tuple(names) for names in aliases.values() for name in names}
    for tied, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if tied in out and source in out:
            out[tied] = tuple(dict.fromkeys((tied, *out[tied], source)))
            out[source] = tuple(dict.fromkeys((*out[source], tied)))
    return out


def _read(source: Source, names: tuple[str, ...], shape, what: str):
    for name in names:
        if (t := source(name)) is not None:
            if tuple(t.shape) != tuple(shape):
                raise StepError(f"{what}: tensor {name} has shape {tuple(t.shape)}, the model expects {tuple(shape)}")
            return t
    raise StepError(f"{what}: tensor {names[0]} is missing" + (f" (nor {', '.join(names[1:])})" if names[1:] else ""))


@contextmanager
def streamed(model, source: Source, *, dtype, device="cpu", what: str = "the checkpoint") -> Iterator[object]:
    """Run ``model`` (from ``empty_model``) with each block's parameters read from ``source`` just before it runs
    and released just after, cast to ``dtype`` on ``device``. Yields the model; the hooks are removed on exit and
    every parameter is back on the meta device. A missing or mis-shaped tensor is a StepError naming it."""
    import torch

    for name, buf in list(model.named_buffers()):
        if buf.device.type == "meta":
            raise StepError(f"{what}: buffer {name} has no value (built on the meta device)")
    if torch.device(device).type != "cpu":   # the buffers (rotary frequencies) go where the weights go
        for module in model.modules():
            for key, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[key] = buf.to(device)
    names = parameter_names(model)
    handles = []

    def load(prefix: str, block) -> None:
        for sub_name, sub in block.named_modules():
            for key, p in list(sub._parameters.items()):
                if p is None:
                    continue
                full = ".".join(x for x in (prefix, sub_name, key) if x)
                t = _read(source, names.get(full, (full,)), p.shape, what)
                sub._parameters[key] = torch.nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)
                del t

    def release(block) -> None:
        for sub in block.modules():
            for key, p in list(sub._parameters.items()):
                if p is not None and p.device.type != "meta":
                    sub._parameters[key] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                              requires_grad=False)

    for prefix, block in blocks(model):
        handles.append(block.register_forward_pre_hook(lambda m, args, prefix=prefix: load(prefix, m)))
        handles.append(block.register_forward_hook(lambda m, args, out: release(m)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for _, block in blocks(model):
            release(block)
