"""The build report's data: one JSON-able dict read from a build's step outputs (never re-running a step).

``gather(loaded, results, record)`` takes the step results by name (objects with ``status``, ``key``,
``seconds``, ``output_digest`` and ``entry.out`` / ``entry.manifest``, as ``forge.orchestrate.build`` returns them) and
the registry record (to be) of the build. Each section is None when its step is not part of the recipe
or did not run (the build stopped at a gate); ``render`` says which.

Step outputs are read here and only here, through each step's typed reader (``<step>.Output.read(entry)``).
"""
from __future__ import annotations

import json
from pathlib import Path
from forge.gpu import fit
from forge.gpu.catalog import gpus
from forge.steps import gate, package, quantize, scan
from forge.steps.graph import active_steps

__all__ = ["gather", "load_fit"]


def gather(loaded, results: dict, record=None, *, provenance: bytes = b"") -> dict:
    r = loaded.recipe
    text = loaded.path.read_text() if Path(loaded.path).is_file() else ""
    steps = []
    summaries = {spec.name: spec.summary for spec in active_steps(loaded)}
    for name in [*summaries, *(n for n in results if n not in summaries)]:
        res = results.get(name)
        m = res.entry.manifest if res is not None else {}
        steps.append({"step": name, "summary": summaries.get(name, ""), "status": res.status if res else "not run",
                      "key": res.key if res else None,   # not this run's seconds: a HIT's lookup time is noise
                      "built_seconds": m.get("seconds"), "built_at": m.get("started_at"),
                      "output_digest": res.output_digest if res else None})
    rec = record.model_dump(mode="json") if record is not None else {}
    return {
        "build": {"name": r.name, "recipe_path": str(loaded.path), "recipe_digest": loaded.digest, "recipe": text,
                  "status": rec.get("status"), "reason": rec.get("reason", ""), "record_id": rec.get("id"),
                  "image_digest": rec.get("image_digest"), "created_at": rec.get("created_at"),
                  "forge_version": rec.get("forge_version"), "method": r.quantize.method, "gpu": r.target.gpu,
                  "engine": r.target.engine, "tool_versions": rec.get("tool_versions", {})},
        "steps": steps,
        "gate": _gate(results),
        "quantize": _quantize(loaded, results),
        "fit": load_fit(loaded),
        "image": _image(results),
        "scan": _scan(results),
        "provenance": _provenance(provenance),
    }


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _gate(results: dict) -> dict | None:
    if "gate" not in results:
        return None
    return _json(gate.Output.read(results["gate"].entry).verdict)


def _quantize(loaded, results: dict) -> dict | None:
    if "quantize" not in results:
        return None
    checkpoint = quantize.Output.read(results["quantize"].entry)
    out, facts = checkpoint.dir, checkpoint.facts
    report = next((_json(p) for p in checkpoint.reports if p.suffix == ".json"), None) or {}
    layers = [{k: row.get(k) for k in ("layer", "bits", "type", "strategy", "group_size", "weight_rel_error",
                                       "backend_error")} | {"kept": False} for row in report.get("layers", [])]
    # Layers the quantizer skipped stay in the model's precision: compressed-tensors names them in
    # quantization_config.ignore, ModelOpt in hf_quant_config.json's exclude_modules.
    config = _json(out / "config.json") or {}
    kept = list((config.get("quantization_config") or {}).get("ignore") or [])
    modelopt = _json(out / "hf_quant_config.json") or {}
    kept += (modelopt.get("quantization") or {}).get("exclude_modules") or []
    listed = {row["layer"] for row in layers}
    layers += [{"layer": name, "kept": True, "weight_rel_error": None, "backend_error": None}
               for name in dict.fromkeys(kept) if name not in listed]
    return {"method": loaded.recipe.quantize.method, "ignore": list(loaded.recipe.quantize.ignore),
            "summary": {**{k: facts.get(k) for k in ("scheme", "bytes", "bf16_bytes", "size_ratio", "calibration_windows",
                                                     "calibration_dtype", "device", "seconds")},
                        "mean_weight_rel_error": (facts.get("backend_facts") or {}).get("mean_weight_rel_error")},
            "verify": facts.get("verify"), "layers": layers}


def load_fit(loaded) -> dict | None:
    """The recipe's capacity plan on its target GPU and on every catalog GPU that can run its scheme."""
    r = loaded.recipe
    shape = loaded.shape    # from the resolution stage (None: config.json was not available offline)
    if shape is None:
        return None
    plan = fit.plan_from_recipe(r)
    if plan.engine == "cpu":   # a CPU target: compare the GPUs it could be served on with vLLM
        from dataclasses import replace

        plan = replace(plan, engine="vllm")
    rows = [fit.fit(shape, g, plan).to_json() for g in gpus().values() if not g.is_cpu]
    return {"target": r.target.gpu, "engine": plan.engine, "params": shape.total_params,
            "max_model_len": plan.max_model_len, "max_num_seqs": plan.max_num_seqs,
            "gpu_memory_utilization": plan.gpu_memory_utilization,
            "gpus": [row for row in rows if row["scheme_ok"]],
            "illegal": [{"gpu": row["gpu"], "why": row["scheme_message"]} for row in rows if not row["scheme_ok"]]}


def _image(results: dict) -> dict | None:
    if "package" not in results:
        return None
    built = package.Output.read(results["package"].entry)
    image, layout = built.image, built.oci_dir

    def blob(digest: str) -> Path:
        return layout / "blobs" / digest.replace(":", "/", 1)

    layers, labels = [], {}
    if image.get("manifest_digest") and blob(image["manifest_digest"]).is_file():
        manifest = json.loads(blob(image["manifest_digest"]).read_text())
        config = _json(blob(manifest["config"]["digest"])) or {}
        labels = (config.get("config") or {}).get("Labels") or {}
        history = [h.get("created_by", "") for h in config.get("history", []) if not h.get("empty_layer")]
        for i, layer in enumerate(manifest["layers"]):
            what = history[i] if i < len(history) and len(history) == len(manifest["layers"]) else ""
            layers.append({"digest": layer["digest"], "size": layer["size"], "media_type": layer["mediaType"],
                           "created_by": what[:160], "weights": layer["digest"] == image.get("weights_layer")})
    model = image.get("model_image") or {}   # container.weights: image: the model image's layers, beside the serving image's
    layers += [{"digest": la["digest"], "size": la["size"], "media_type": "application/vnd.oci.image.layer.v1.tar",
                "created_by": f"model image {model.get('manifest_digest', '')[:19]}: /models/{la['files']}"[:160],
                "weights": True} for la in model.get("layers", [])]
    return {"manifest_digest": image.get("manifest_digest"), "model_image_digest": model.get("manifest_digest"),
            "modelpack_digest": model.get("modelpack_digest"), "base": image.get("base"), "engine": image.get("engine"),
            "builder": image.get("builder"), "build_seconds": image.get("build_seconds"), "tag": image.get("tag"),
            "smoke_test": image.get("smoke_test"), "size": sum(layer["size"] for layer in layers),
            "cuda": labels.get("dev.forge.cuda.version"), "min_driver": labels.get("dev.forge.driver.min"),
            "engine_version": labels.get("dev.forge.engine.version"),
            "base_name": labels.get("org.opencontainers.image.base.name"),
            "base_digest": labels.get("org.opencontainers.image.base.digest"), "labels": labels, "layers": layers}


def _scan(results: dict) -> dict | None:
    if "scan" not in results:
        return None
    scanned = scan.Output.read(results["scan"].entry)
    verdict = _json(scanned.verdict) or {}
    sbom = _json(scanned.sbom) if scanned.sbom is not None else None
    return {"status": scanned.status, "passed": scanned.passed,   # as the scan verdict decides it (re-judged)
            "summary": verdict.get("summary") or verdict.get("reason", ""), "fail_on": verdict.get("fail_on"),
            "counts": verdict.get("counts", {}), "blocking": verdict.get("blocking", []),
            "ignored": verdict.get("ignored", []), "unfixed_dropped": verdict.get("unfixed_dropped", 0),
            "trivy": {k: (verdict.get("trivy") or {}).get(k) for k in ("version", "db_updated_at")},
            "sbom_components": len(sbom.get("components") or []) if isinstance(sbom, dict) else None}


def _provenance(data: bytes) -> dict | None:
    if not data:
        return None
    st = json.loads(data)
    pred = st.get("predicate", {})
    return {"type": st.get("predicateType"), "subject": st.get("subject", []),
            "builder": pred.get("runDetails", {}).get("builder", {}).get("id"),
            "dependencies": pred.get("buildDefinition", {}).get("resolvedDependencies", []),
            "byproducts": pred.get("runDetails", {}).get("byproducts", [])}
