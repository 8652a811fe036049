"""Every environment variable forge reads, declared once with what it does.

Modules read them through ``get(NAME)``; reading an undeclared name is a bug (KeyError), so this
table stays the complete list (the README's table is checked against it by a test).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Var", "VARS", "get", "flag"]


@dataclass(frozen=True)
class Var:
    name: str
    doc: str
    default: str | None = None


VARS: dict[str, Var] = {v.name: v for v in (
    Var("FORGE_CACHE_DIR", "Step cache root (default: $XDG_CACHE_HOME/forge)."),
    Var("FORGE_REGISTRY_DIR", "Embedded registry root (default: $XDG_DATA_HOME/forge/registry)."),
    Var("FORGE_CI", "CI mode, as --ci: unpinned inputs are errors instead of warnings."),
    Var("FORGE_DEBUG", "Show the traceback of internal errors."),
    Var("FORGE_PUBLISH_TO", "Publish here instead of the recipe's publish.registry (as --publish-to)."),
    Var("FORGE_GPU_PRICES", "Override catalog GPU prices for `forge fit`: NAME=USD_PER_HOUR,…"),
    Var("FORGE_CPU_CALIBRATION_DTYPE", "Force the CPU calibration dtype (float32 or bfloat16)."),
    Var("FORGE_INSECURE_REGISTRIES", "Comma-separated registry hosts reached over plain HTTP besides loopback."),
    Var("FORGE_REGISTRY_USER", "Registry user name (with FORGE_REGISTRY_PASSWORD)."),
    Var("FORGE_REGISTRY_PASSWORD", "Registry password; never logged, never in an image."),
    Var("FORGE_PIP_INDEX_URL", "Python package index used when building forge's base images."),
    Var("FORGE_PIP_FIND_LINKS", "Local wheel directory used when building forge's base images."),
    Var("FORGE_BUILDAH_ROOT", "buildah storage root (default: buildah's own)."),
    Var("FORGE_BUILDAH_STORAGE_DRIVER", "buildah storage driver.", "vfs"),
    Var("FORGE_TEST_STOP_BEFORE_COMMIT", "Test hook: stop a build after STEP wrote its outputs, before commit."),
    Var("FORGE_REPORT_DIR", "Where `forge build` writes report.html, junit.xml and summary.md (as --report-dir)."),
    Var("GITHUB_ACTIONS", "Set to 'true' by GitHub Actions: with --ci, forge prints workflow annotations."),
    Var("GITHUB_STEP_SUMMARY", "GitHub Actions' job summary file: with --ci, forge appends the build's summary."),
    Var("GITHUB_WORKSPACE", "GitHub Actions' checkout root: annotation paths are made relative to it."),
    Var("XDG_CACHE_HOME", "Base of the default step cache."),
    Var("XDG_DATA_HOME", "Base of the default embedded registry."),
    Var("XDG_RUNTIME_DIR", "Where container tools keep their auth file."),
    Var("REGISTRY_AUTH_FILE", "Container registry auth file (containers-auth.json format)."),
    Var("CUDA_VISIBLE_DEVICES", "Which GPUs the quantize step may use (empty: none)."),
    Var("PIP_CERT", "CA bundle mounted (never copied) into base-image builds."),
    Var("REQUESTS_CA_BUNDLE", "CA bundle mounted (never copied) into base-image builds."),
    Var("SSL_CERT_FILE", "CA bundle mounted (never copied) into base-image builds."),
    Var("PIP_FIND_LINKS", "Local wheel directory for base-image builds (FORGE_PIP_FIND_LINKS wins)."),
)}


def get(name: str) -> str | None:
    """The variable's value, or its declared default. An undeclared name is a bug in forge."""
    var = VARS[name]
    return os.environ.get(name, var.default)


def flag(name: str) -> bool:
    """A boolean variable: set to anything but '', '0', 'false', 'no'."""
    return (get(name) or "").strip().lower() not in ("", "0", "false", "no")
