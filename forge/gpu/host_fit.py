"""What a build needs of the host's memory, step by step, and whether this host has it (issue 28).

A step that holds the whole model in the process (quantize with its verification, an eval on the CPU) needs
its bytes in anonymous memory: the kernel kills the process when they do not fit, silently. forge computes
each step's need from config.json alone (parameter count x bytes per parameter x the step's factor, plus the
libraries) and refuses what cannot fit before any weight is read: exit 2 at ``forge validate``, exit 5 when
the step is about to run. The factors are the peak RSS of forge's own quantize step over the BF16 checkpoint's
size on two model shapes, fitted as a line (bench/results/scale-*.json: the intercept is the libraries):

    data-free FP8/INT8 (load, quantize, export, verify)   1.5 x BF16 bytes + 1.1 GB   (3B: 9.75 GB measured)
    GPTQ/AWQ/SmoothQuant calibrated in float32             3.0 x BF16 bytes + 1.1 GB   (3B: 19.32 GB measured)
    ... calibrated in bfloat16 (a CPU with native bf16)     1.7 x BF16 bytes + 1.1 GB
    an eval on the CPU (lm-eval's hf backend, float32)     2.0 x BF16 bytes + 1.1 GB

With streaming (FORGE_STREAMING, the default) a data-free scheme the backend streams (FP8 dynamic through
llm-compressor) never holds the model: ``model_free_ptq`` holds the shards it quantizes at once, and the reference
and the verification one block at a time (a decoder layer, or the embeddings / the output head):

    streamed FP8 quantize, per shard quantized at once     1.2 x the shard's bytes (a shard is assumed to be at most
                                                           5 GB, the Hub's convention, until its files are seen)
    streamed reference / verification                      4 x the largest block's BF16 bytes (the block, the
                                                           dequantized float32 weight, the BF16 original it is
                                                           compared with)
    need: the larger of the two, for one shard at a time, + 1.1 GB libraries; on a GPU the step then runs as
    many shards at once as there are cores and memory for, on a CPU one (``streaming_workers``).

The reference step is not counted apart: it runs one block at a time (the streamed need covers it). On a GPU
the weights go to VRAM (``forge.gpu.fit``), not counted here.

Offloaded calibration (issue 28 item 4): when a method llm-compressor calibrates (GPTQ, AWQ, INT8, static FP8)
does not fit in memory, the model is loaded with its weights left in the safetensors files (compressed-tensors'
disk offload: links to the snapshot's shards, no copy when the calibration dtype is the stored one) and the
sequential pipeline onloads one decoder layer at a time; the checkpoint is the in-memory one, tensor for tensor.
Its need, in the calibration dtype:

    offloaded calibration      the larger of
                                 2 x the largest block (the onloaded layer, the resident budget the loader may
                                 keep on the CPU: ``offload_budget``)
                                 + 2 x one layer's Hessians (in_features^2 float32 per Linear, and the solve's copy)
                                 + 2 x the calibration activations (samples x tokens x hidden: a layer's inputs and
                                 outputs)
                               and the streamed verification after it (4 x the largest BF16 block), + 1.1 GB
                               libraries. Measured: the 3B shape's offloaded GPTQ build peaked at 2.51 GB (need
                               2.82 GB; bench/results/scale-llama-3.2-3b-gptq-offloaded-in-5gb-cgroup.json).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from forge.core import host, options
from forge.core.errors import ResourceError
from forge.model.shape import ModelShape

GB = 1e9
LIBRARIES = 1.1 * GB                       # torch, transformers, llm-compressor / lm-eval, imported
FACTORS = {"data-free": 1.5, "float32": 3.0, "bfloat16": 1.7, "eval": 2.0, "shard": 1.2, "block": 4.0,
           "offload_block": 2.0, "hessians": 2.0, "activations": 2.0}
SHARD_ASSUMED = 5 * GB                     # the largest shard, before the snapshot's files are seen
STEPS = {"quantize": ("quantize",), "eval": ("eval_baseline", "eval_candidate"),   # need -> the steps it holds for
         "reference": ("reference",)}


@dataclass(frozen=True)
class Need:
    step: str                 # quantize | eval | reference (STEPS: the steps it is for)
    bytes: float
    why: str                  # how it was computed, in words a user can check
    advice: str = ""          # what to do when it does not fit
    streamed: tuple[float, float, str] | None = None   # (model, block, method) of a streamed quantize, whose shard
                                                       # size is assumed until the snapshot's files are seen
    offloaded: tuple[float, str, float] | None = None  # (bytes, why, CPU budget) when the step can calibrate with
                                                       # the weights offloaded to disk instead (``offloaded_need``)
    outcome: str = "the kernel would kill the build"   # what running it anyway would do

    def shortfall(self, available: float) -> str | None:
        if self.bytes <= available or self.offloads(available):
            return None
        alternative = (f", or {self.offloaded[0] / GB:.1f} GB with the weights offloaded to disk "
                       f"({self.offloaded[1]})") if self.offloaded else ""
        return (f"{self.step} needs {self.bytes / GB:.1f} GB of host memory ({self.why}){alternative}; "
                f"{available / GB:.1f} GB available")

    def offloads(self, available: float) -> bool:
        """Whether the step calibrates offloaded with ``available`` bytes: the whole model does not fit, the
        offloaded run does."""
        return self.offloaded is not None and self.bytes > available and self.offloaded[0] <= available


def bf16_bytes(shape: ModelShape) -> float:
    return 2.0 * shape.total_params


def largest_block(shape: ModelShape) -> float:
    """BF16 bytes of the largest unit a streamed run holds: a decoder layer, or the embeddings / output head."""
    per_layer = (shape.total_params - shape.embedding_params - shape.lm_head_params) / max(1, shape.num_layers)
    return 2.0 * max(per_layer, shape.embedding_params)


def needs(shape: ModelShape | None, method: str, *, calibrates: bool, evaluates: bool,
          device: str | None = None, recipe_dtype: str = "bfloat16", streams: bool = False,
          offloads: bool = False, calibration: tuple[int, int] = (128, 512),
          whole_reference: bool = False) -> tuple[Need, ...]:
    """The steps of a recipe that hold the model in host memory on ``device`` (this host's by default);
    ``streams``: the quantize step streams this method (then it never holds the model); ``offloads``: its backend
    can calibrate it with the weights offloaded to disk, on ``calibration`` (samples, tokens per sample);
    ``whole_reference``: the reference step loads the whole model (FORGE_STREAMING=0)."""
    device = device or host.device()
    if shape is None or device != "cpu":
        return ()
    model = bf16_bytes(shape)
    dtype = calibration_dtype(2 * model, recipe_dtype) if calibrates else None
    out = needs_for(model, method, calibrates=calibrates, evaluates=evaluates, dtype=dtype,
                    block=largest_block(shape) if streams else None,
                    offloaded=offloaded_need(shape, dtype, *calibration) if offloads and calibrates else None)
    return out + ((reference_need(model),) if whole_reference else ())


def reference_need(model: float) -> Need:
    """The reference step with the whole BF16 model loaded (FORGE_STREAMING=0). Refused when it does not fit:
    transformers maps the shards, so it would not be killed but page them from disk for each greedy token (the
    14B shape on a 24 GiB host: still in that step after 21 minutes)."""
    need = model + LIBRARIES
    return Need("reference", need, f"FORGE_STREAMING=0 loads the whole model for the BF16 reference tokens: "
                                   f"{model / GB:.1f} GB BF16 + {LIBRARIES / GB:.1f} GB libraries",
                f"Unset FORGE_STREAMING (the reference step then holds one decoder layer at a time), or use "
                f"{_room(need)}.", outcome="transformers would page the model from disk for each token")


def layer_hessians(shape: ModelShape) -> float:
    """Bytes of GPTQ's float32 Hessians for one decoder layer's Linear modules (in_features^2 each)."""
    per_layer = [(fan_in, count // max(1, shape.num_layers)) for name, fan_in, _, count in shape.linear_layers()
                 if name != "lm_head"]
    return sum(4.0 * fan_in * fan_in * max(1, n) for fan_in, n in per_layer)


def offloaded_need(shape: ModelShape, dtype: str | None, samples: int, tokens: int) -> tuple[float, str, float]:
    """(bytes, how, CPU budget) of a calibration run with the weights offloaded to disk, one layer onloaded at
    a time, in ``dtype`` (the calibration's)."""
    width = 4 if dtype == "float32" else 2
    block = largest_block(shape) / 2 * width
    hessians = layer_hessians(shape)
    activations = float(samples) * tokens * shape.hidden_size * width
    calibrate = (FACTORS["offload_block"] * block + FACTORS["hessians"] * hessians
                 + FACTORS["activations"] * activations)
    verify = FACTORS["block"] * largest_block(shape)
    how = (f"one decoder layer onloaded at a time in {dtype or 'the recipe dtype'}: {FACTORS['offload_block']} x "
           f"{block / GB:.2f} GB block + {FACTORS['hessians']} x {hessians / GB:.2f} GB Hessians + "
           f"{FACTORS['activations']} x {activations / GB:.2f} GB activations ({samples} x {tokens} tokens)"
           + (f", or the verification's {FACTORS['block']} x {largest_block(shape) / GB:.2f} GB block"
              if verify > calibrate else "") + f", + {LIBRARIES / GB:.1f} GB libraries")
    return max(calibrate, verify) + LIBRARIES, how, block


def offload_budget(needs_: tuple[Need, ...], available: float | None = None) -> float | None:
    """The CPU budget (bytes of weights the loader may keep resident) when the quantize step calibrates with the
    weights offloaded to disk on this host now; None when it holds the model (or cannot offload)."""
    quantize = next((n for n in needs_ if n.step == "quantize"), None)
    if quantize is None or quantize.offloaded is None:
        return None
    return quantize.offloaded[2] if quantize.offloads(available_bytes() if available is None else available) else None


def streamed_need(model: float, block: float, shard: float | None = None) -> tuple[float, str]:
    """(bytes, how) a streamed quantize step needs with one shard at a time (``shard``: the largest, when known)."""
    shard = min(model, shard or SHARD_ASSUMED)
    quantize, verify = FACTORS["shard"] * shard, FACTORS["block"] * block
    how = (f"streamed: the larger of {FACTORS['shard']} x {shard / GB:.1f} GB for a shard quantized at a time and "
           f"{FACTORS['block']} x {block / GB:.2f} GB for a block verified at a time, + {LIBRARIES / GB:.1f} GB "
           "libraries; it never holds the model")
    return max(quantize, verify) + LIBRARIES, how


def streaming_workers(snapshot: Path, available: float | None = None, device: str | None = None) -> int:
    """How many shards a streamed quantize step quantizes at once: one per core, as many as memory holds (the
    verification after it holds one block); a ResourceError (exit 5) with the numbers when not even one fits.
    On a CPU (``device``: this host's by default) one: compressed-tensors' scheduler runs CPU jobs one after the
    other whatever ``max_workers`` says (``exec_jobs_dynamic``), and each job's ops use every core."""
    shards = [p.stat().st_size for p in Path(snapshot).glob("*.safetensors")]
    largest = max(shards, default=0)
    available = available_bytes() if available is None else available
    per_shard = FACTORS["shard"] * largest
    if per_shard + LIBRARIES > available:
        raise ResourceError(f"quantize: streaming needs {(per_shard + LIBRARIES) / GB:.1f} GB of host memory for its "
                            f"largest shard ({FACTORS['shard']} x {largest / GB:.1f} GB + {LIBRARIES / GB:.1f} GB "
                            f"libraries); {available / GB:.1f} GB available",
                            hint="Re-shard the checkpoint into smaller files (save_pretrained(max_shard_size='2GB')) "
                                 f"or use {_room(per_shard + LIBRARIES)}.")
    if (device or host.device()) == "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, len(shards), int((available - LIBRARIES) // max(per_shard, 1.0))))


def needs_for(model: float, method: str, *, calibrates: bool, evaluates: bool,
              dtype: str | None = None, block: float | None = None,
              offloaded: tuple[float, str, float] | None = None) -> tuple[Need, ...]:
    """``needs`` for a model of ``model`` BF16 bytes on the CPU; ``dtype``: the calibration's (default: this
    host's choice for it, ``calibration_dtype``); ``block``: the largest block's BF16 bytes when the quantize
    step streams (``streamed_need``); ``offloaded``: ``offloaded_need`` when it can calibrate offloaded."""
    out = []
    if method not in ("none", "auto") and block is not None and not calibrates:
        need, how = streamed_need(model, block)
        out.append(Need("quantize", need, f"{method} {how}", _advice(need, calibrates), streamed=(model, block, method)))
    elif method not in ("none", "auto"):
        if calibrates:
            dtype = dtype or calibration_dtype(2 * model)
            factor = FACTORS["float32"] if dtype == "float32" else FACTORS["bfloat16"]   # float16 weighs as bf16
            how = f"{method} loads the whole model and calibrates it in {dtype}"
        else:
            factor, how = FACTORS["data-free"], f"{method} loads the whole model, quantizes and verifies it"
        need = factor * model + LIBRARIES
        out.append(Need("quantize", need, f"{how}: {factor} x {model / GB:.1f} GB BF16 + {LIBRARIES / GB:.1f} GB "
                                          "libraries", _advice(min(need, offloaded[0]) if offloaded else need, calibrates),
                        offloaded=offloaded))
    if evaluates:
        need = FACTORS["eval"] * model + LIBRARIES
        out.append(Need("eval", need, f"lm-eval's hf backend holds the model in float32 on the CPU: "
                                      f"{FACTORS['eval']} x {model / GB:.1f} GB BF16 + {LIBRARIES / GB:.1f} GB libraries",
                        f"Evaluate where a GPU is (eval.backend: auto picks it), or use {_room(need)}."))
    return tuple(out)


def serving_need(weights: float, kv_cache: float, how: str) -> Need:
    """What serving an image on this host's CPU holds: the weights as its engine holds them (``how`` says which),
    the KV cache the image plans, the libraries. The smoke test is skipped, with these numbers, where it does not
    fit: the server would map the weights and page them from disk for every token, and time out after minutes."""
    need = weights + kv_cache + LIBRARIES
    kv = f" + {kv_cache / GB:.1f} GB KV cache" if kv_cache else ""
    return Need("serve", need, f"{how}: {weights / GB:.1f} GB{kv} + {LIBRARIES / GB:.1f} GB libraries",
                f"Smoke-test it on {_room(need)}, or where its GPU is.")


def _room(need: float) -> str:
    return f"a machine with >= {need / GB * 1.1:.0f} GB of memory"


def _advice(need: float, calibrates: bool) -> str:
    if not calibrates:
        return f"Quantize where a GPU is (the weights go to VRAM), or use {_room(need)}."
    return (f"Use a data-free method such as fp8 ({FACTORS['data-free']} x the BF16 size), a CPU with native bf16 "
            f"(FORGE_CPU_CALIBRATION_DTYPE=bfloat16 when it has), a GPU, or {_room(need)}.")


def float32_fits(float32_bytes: float, memory: int) -> bool:
    """Whether a CPU calibration may load the model in float32: when it takes at most half of the memory (the
    rule of ``forge.steps.quantize.calibration_dtype``, which picks the dtype the step runs in)."""
    return float32_bytes <= memory // 2


def calibration_dtype(float32_bytes: float, recipe_dtype: str = "bfloat16") -> str:
    """The dtype a CPU calibration of a model of ``float32_bytes`` (in float32) runs in on this host, as the
    quantize step chooses it (``forge.steps.quantize.calibration_policy``): the user's, else the recipe's on a
    CPU with native bf16, else float32 where it fits half of the memory, else the recipe's."""
    if forced := options.current().cpu_calibration_dtype:
        return forced
    if recipe_dtype == "bfloat16" and host.cpu_has_native_bf16():
        return recipe_dtype
    return "float32" if float32_fits(float32_bytes, host.memory_bytes()) else recipe_dtype


def available_bytes() -> float:
    """What a new process can take now: MemAvailable, within the room left under this process's cgroup limits."""
    avail = float(host.memory_bytes())
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = min(avail, int(line.split()[1]) * 1024)
    except OSError:
        pass
    room = cgroup_room()
    return avail if room is None else min(avail, room)


# cgroup v2 (unified) and v1 (memory controller): (limit file, usage file, memory.stat's page cache, its shmem part)
_CGROUP_FILES = {"v2": ("memory.max", "memory.current", "file", "shmem"),
                 "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache", "total_shmem")}


def cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The least room under any memory limit of this process's cgroups, from its own up to the root (a CI runner's
    container limit, a systemd scope's MemoryMax): limit − (usage − the page cache the kernel drops before it kills:
    file pages, active or not, less shmem, which has no file to go back to). A build that has just read a snapshot
    has gigabytes of it cached and charged to its cgroup (measured: 3.8 GB of a 5 GB limit, 3.3 GB of it active),
    and counting them as used would refuse the next step for memory it has. None: no limit applies."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    room = None
    for line in lines:
        if line.count(":") < 2:   # not a cgroup line: nothing to read a limit from
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mount, kind = next((m for m in (root, root / "unified") if (m / "cgroup.controllers").exists()), root), "v2"
        elif "memory" in controllers.split(","):
            mount, kind = root / "memory", "v1"
        else:
            continue
        limit_file, usage_file, cache_stat, shmem_stat = _CGROUP_FILES[kind]
        d = mount / path.lstrip("/")
        while True:
            limit, used = _read_int(d / limit_file), _read_int(d / usage_file)
            if limit is not None and limit < 1 << 62 and used is not None:
                stat = _stats(d / "memory.stat")
                droppable = max(0, stat.get(cache_stat, 0) - stat.get(shmem_stat, 0))
                room = min(room if room is not None else float("inf"), float(limit - max(0, used - droppable)))
            if d == mount or mount not in d.parents:
                break
            d = d.parent
    return room


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None   # "max" (v2: no limit) is None


def _stats(path: Path) -> dict[str, int]:
    """memory.stat as {name: value}; empty when unreadable."""
    try:
        return {k: int(v) for k, _, v in (line.partition(" ") for line in path.read_text().splitlines()) if v.isdigit()}
    except OSError:
        return {}


def shortfalls(needs_: tuple[Need, ...], available: float | None = None) -> list[tuple[Need, str]]:
    """(need, message) for each need this host cannot meet now."""
    available = available_bytes() if available is None else available
    return [(n, msg) for n in needs_ if (msg := n.shortfall(available))]


def require(needs_: tuple[Need, ...], step: str, inputs: dict[str, Path] | None = None) -> None:
    """Refuse ``step`` (exit 5) before it loads a weight when its need exceeds what this host has now. ``inputs``:
    the step's upstream outputs; a streamed quantize's need is then taken with the snapshot's largest shard."""
    snapshot = (inputs or {}).get("resolve")
    for need, msg in shortfalls(tuple(_seen(n, snapshot) for n in needs_ if step in STEPS[n.step])):
        raise ResourceError(f"{step}: {msg}; {need.outcome}", hint=need.advice)


def _seen(need: Need, snapshot: Path | None) -> Need:
    """A streamed need with the largest shard of ``snapshot`` instead of the assumed one (when there are shards)."""
    shards = [p.stat().st_size for p in Path(snapshot).glob("*.safetensors")] if snapshot and need.streamed else []
    if not shards:
        return need
    model, block, method = need.streamed
    size, how = streamed_need(model, block, max(shards))
    return Need(need.step, size, f"{method} {how}", _advice(size, False), need.streamed)