"""Benchmark: scale-out of independent builds on Ray (``forge build --executor ray``) on this machine.

Four independent tiny-model recipes (four checkpoints differing in their weights, so no step is shared:
resolve → quantize fp8 → eval baseline/candidate → gate each) are built twice from empty caches:
one after the other with the local executor, and all at once through a Ray cluster of two 1-CPU nodes
(the harness of tests/test_ray_executor.py: a head and a second raylet, and a Distribution registry as the
remote step cache, inside a private network namespace). Prints JSON: sequential seconds, Ray seconds,
efficiency = sequential / (Ray x workers) (goal >= 0.8), and the machine's load average, since other
work on the machine shares its CPUs.

    sudo .venv/bin/python bench/ray_scaleout.py        # needs root (unshare) and the ray extra
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
VARIANTS, WORKERS = 4, 2


def _models(work: Path) -> list[Path]:
    """Four tiny checkpoints: conftest's tiny Llama, its weights nudged per copy (so every key differs)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    import conftest

    class _Tmp:
        def mktemp(self, name: str) -> Path:
            (work / name).mkdir()
            return work / name

    base = conftest._tiny_model(_Tmp(), "tiny-base", "LlamaConfig", "LlamaForCausalLM")
    out = []
    for i in range(VARIANTS):
        dest = work / f"v{i}" / "model"
        shutil.copytree(base, dest)
        weights = load_file(dest / "model.safetensors")
        weights = {k: (v + (i + 1) * 1e-2 * torch.ones_like(v) if k.endswith("embed_tokens.weight") else v)
                   for k, v in weights.items()}
        save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
        out.append(dest)
    return out


def _recipes(models: list[Path]) -> list[Path]:
    from test_ray_executor import write_workdir

    recipes = []
    for model in models:
        work = model.parent / "work"
        work.mkdir()
        recipes.append(write_workdir(work, model)["kill"])   # a plain single-target recipe (CPU, fp8, eval gate)
    return recipes


def _inside(work: Path) -> dict:
    from forge.orchestrate.build import execute
    from forge.store.remote import RemoteCache
    from forge.executors.ray import RayExecutor
    from forge.recipe.load import load_recipe
    from forge.store.local import Store
    from test_ray_executor import cluster

    recipes = _recipes(_models(work))
    t0 = time.perf_counter()
    for i, recipe in enumerate(recipes):
        assert execute(load_recipe(recipe), Store(work / f"seq-cache-{i}")).passed
    sequential = time.perf_counter() - t0

    with cluster(work) as (address, registry, _):
        remote = RemoteCache.parse(f"oci://{registry}/bench-cache", "readwrite")
        import ray

        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        outcomes: list = [None] * len(recipes)

        def one(i: int) -> None:
            loaded, store = load_recipe(recipes[i]), Store(work / f"ray-driver-{i}")
            outcomes[i] = execute(loaded, store, cache_remote=remote,
                                  executor=RayExecutor(loaded, store, address=address, cache_remote=remote))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(recipes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        on_ray = time.perf_counter() - t0
        ray.shutdown()
    assert all(o is not None and o.passed for o in outcomes), "a Ray build failed"
    return {"variants": VARIANTS, "workers": WORKERS, "sequential_s": round(sequential, 1), "ray_s": round(on_ray, 1),
            "efficiency": round(sequential / (on_ray * WORKERS), 3), "goal": 0.8,
            "steps_built_on_ray": sum(r.status == "BUILT" for o in outcomes for r in o.results),
            "load_average": os.getloadavg(), "cpus": os.cpu_count()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--inside":
        work = Path(sys.argv[2])
        (work / "result.json").write_text(json.dumps(_inside(work)))
        return
    work = Path(tempfile.mkdtemp(prefix="forge-bench-ray-"))
    subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", sys.executable, __file__, "--inside", str(work)],
                   check=True, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    print(json.dumps(json.loads((work / "result.json").read_text()), indent=2))


if __name__ == "__main__":
    main()
