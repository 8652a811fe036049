"""Every environment variable forge reads, declared once with what it does, and read in this module only.

``Options`` is what forge's modules see: typed fields read from the environment here (``current()``; the
resolution stage keeps the build's own copy on ``Resolved.options`` and hands it to the steps). ``get(NAME)`` is
this module's reader; asking for an undeclared name is a bug (KeyError), so the table stays the complete list (the
README's table is checked against it by a test, and another test finds no ``get`` call outside this module).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Var", "VARS", "Options", "current", "get", "flag", "QUIET", "quiet_libraries", "passthrough"]


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
    Var("FORGE_NO_SUPERVISOR", "Set to 1: `forge build` runs in one process (by default it waits on a child, to report an OOM kill)."),
    Var("FORGE_PLUGINS", "Extra backends/engines: KIND:NAME=module:attr, space- or comma-separated "
                         "(KIND backend or engine), e.g. engine:echo=my_engine:ENGINE."),
    Var("FORGE_CACHE_REMOTE", "Remote step cache, as --cache-remote: oci://HOST[:PORT]/REPO (pull MISSes, push built steps)."),
    Var("FORGE_CACHE_REMOTE_MODE", "As --cache-remote-mode: readwrite (default) or read (pull only, for untrusted builds).",
        "readwrite"),
    Var("FORGE_PUBLISH_TO", "Publish here instead of the recipe's publish.registry (as --publish-to)."),
    Var("FORGE_GPU_PRICES", "Override catalog GPU prices for `forge fit`: a JSON object, GPU name -> USD per hour."),
    Var("FORGE_CPU_CALIBRATION_DTYPE", "Force the CPU calibration dtype (float32 or bfloat16)."),
    Var("FORGE_STREAMING", "1 (default): data-free schemes (fp8) quantize shard by shard, and the reference and FP8 "
                           "verification run one decoder layer at a time; 0: hold the whole model, as before.", "1"),
    Var("FORGE_INSECURE_REGISTRIES", "Comma-separated registry hosts reached over plain HTTP besides loopback."),
    Var("FORGE_REGISTRY_USER", "Registry user name (with FORGE_REGISTRY_PASSWORD)."),
    Var("FORGE_REGISTRY_PASSWORD", "Registry password; never logged, never in an image."),
    Var("FORGE_PIP_INDEX_URL", "Python package index used when building forge's base images."),
    Var("FORGE_PIP_FIND_LINKS", "Local wheel directory used when building forge's base images."),
    Var("FORGE_BUILDAH_ROOT", "buildah storage root (default: buildah's own)."),
    Var("FORGE_BUILDAH_STORAGE_DRIVER", "buildah storage driver: auto (default) keeps the driver a storage root "
                                         "already uses, else overlay where forge can mount one, else vfs.", "auto"),
    Var("RAY_ADDRESS", "Ray cluster `forge build --executor ray` connects to (as --ray-address; e.g. ray://head:10001, auto)."),
    Var("FORGE_TEST_STOP_BEFORE_COMMIT", "Test hook: stop a build after STEP wrote its outputs, before commit."),
    Var("TQDM_DISABLE", "Set to 1 by forge during a build (unless set): forge draws its own progress."),
    Var("TRANSFORMERS_VERBOSITY", "Set to error by forge during a build (unless set)."),
    Var("LLM_COMPRESSOR_LOG_LEVEL", "Set empty by forge while quantizing (unless set): llm-compressor's log goes to a file."),
    Var("OMP_NUM_THREADS", "Threads per OpenMP pool (torch's): when set, also set in the servers forge starts from images "
                           "(smoke test, image eval), so a server beside other work keeps to its cores."),
    Var("MKL_NUM_THREADS", "As OMP_NUM_THREADS, for MKL: passed to the servers forge starts from images when set."),
    Var("PYTHONPATH", "Kept, with forge's own directory first, for the workers of the process executor."),
    Var("FORGE_REPORT_DIR", "Where `forge build` writes report.html, junit.xml and summary.md (as --report-dir)."),
    Var("GITHUB_ACTIONS", "Set to 'true' by GitHub Actions: with --ci, forge prints workflow annotations."),
    Var("GITHUB_STEP_SUMMARY", "GitHub Actions' job summary file: with --ci, forge appends the build's summary."),
    Var("GITHUB_WORKSPACE", "GitHub Actions' checkout root: annotation paths are made relative to it."),
    Var("XDG_CACHE_HOME", "Base of the default step cache."),
    Var("XDG_DATA_HOME", "Base of the default embedded registry (and of rootless buildah's storage)."),
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


# Library settings forge sets for itself (a user's own value wins): forge draws its own progress, and the
# libraries' tqdm bars and info chatter would interleave with it.
QUIET = {"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "LLM_COMPRESSOR_LOG_LEVEL": ""}


def quiet_libraries() -> None:
    """Quiet the libraries forge runs (tqdm, transformers, llm-compressor) unless the user set them."""
    for name, value in QUIET.items():
        os.environ.setdefault(name, value)


def passthrough(drop: tuple[str, ...], drop_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment for a child tool (buildah), without the named secrets and prefixes."""
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(drop_prefixes)}


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(h.strip() for h in (value or "").replace(",", " ").split() if h.strip())


@dataclass(frozen=True)
class Options:
    """forge's settings from the environment, read once per use (``current()``) and passed down from there."""

    cache_dir: Path                       # FORGE_CACHE_DIR, else $XDG_CACHE_HOME/forge
    registry_dir: Path                    # FORGE_REGISTRY_DIR, else $XDG_DATA_HOME/forge/registry
    data_home: Path                       # $XDG_DATA_HOME, else ~/.local/share (rootless buildah's storage is there)
    debug: bool = False
    plugins: str = ""
    ray_address: str | None = None
    gpu_prices: str | None = None         # JSON, GPU name -> USD per hour
    cpu_calibration_dtype: str | None = None
    streaming: bool = True                # FORGE_STREAMING
    insecure_registries: tuple[str, ...] = ()
    registry_user: str | None = field(default=None, repr=False)
    registry_password: str | None = field(default=None, repr=False)
    registry_auth_files: tuple[Path, ...] = ()   # the container auth files skopeo and oras read, in order
    pip_index_url: str | None = None
    pip_find_links: str | None = None     # FORGE_PIP_FIND_LINKS, else PIP_FIND_LINKS
    ca_bundle: str | None = None          # PIP_CERT, else REQUESTS_CA_BUNDLE, else SSL_CERT_FILE
    buildah_root: str | None = None
    buildah_storage_driver: str = "auto"
    stop_before_commit: str | None = None  # test hook (FORGE_TEST_STOP_BEFORE_COMMIT)
    pythonpath: str | None = None
    github_actions: bool = False
    github_workspace: str | None = None
    github_step_summary: str | None = None
    cuda_visible_devices: str | None = None
    no_supervisor: bool = False

    @classmethod
    def from_env(cls) -> "Options":
        home = Path.home()
        cache = get("FORGE_CACHE_DIR")
        registry = get("FORGE_REGISTRY_DIR")
        auth = [Path(a) for a in (get("REGISTRY_AUTH_FILE"),) if a]
        if run := get("XDG_RUNTIME_DIR"):
            auth.append(Path(run) / "containers" / "auth.json")
        auth.append(home / ".config" / "containers" / "auth.json")
        data_home = Path(get("XDG_DATA_HOME") or home / ".local" / "share")
        return cls(
            cache_dir=Path(cache).expanduser() if cache else Path(get("XDG_CACHE_HOME") or home / ".cache") / "forge",
            registry_dir=Path(registry).expanduser() if registry else
            data_home / "forge" / "registry", data_home=data_home,
            debug=flag("FORGE_DEBUG"), no_supervisor=flag("FORGE_NO_SUPERVISOR"), plugins=get("FORGE_PLUGINS") or "", ray_address=get("RAY_ADDRESS"),
            gpu_prices=get("FORGE_GPU_PRICES"), cpu_calibration_dtype=get("FORGE_CPU_CALIBRATION_DTYPE"),
            streaming=(get("FORGE_STREAMING") or "1").strip().lower() not in ("0", "false", "no"),
            insecure_registries=_list(get("FORGE_INSECURE_REGISTRIES")),
            registry_user=get("FORGE_REGISTRY_USER"), registry_password=get("FORGE_REGISTRY_PASSWORD"),
            registry_auth_files=tuple(auth), pip_index_url=get("FORGE_PIP_INDEX_URL"),
            pip_find_links=get("FORGE_PIP_FIND_LINKS") or get("PIP_FIND_LINKS"),
            ca_bundle=get("PIP_CERT") or get("REQUESTS_CA_BUNDLE") or get("SSL_CERT_FILE"),
            buildah_root=get("FORGE_BUILDAH_ROOT"), buildah_storage_driver=get("FORGE_BUILDAH_STORAGE_DRIVER") or "auto",
            stop_before_commit=get("FORGE_TEST_STOP_BEFORE_COMMIT"), pythonpath=get("PYTHONPATH"),
            github_actions=(get("GITHUB_ACTIONS") or "").lower() == "true", github_workspace=get("GITHUB_WORKSPACE"),
            github_step_summary=get("GITHUB_STEP_SUMMARY"), cuda_visible_devices=get("CUDA_VISIBLE_DEVICES"))


def current() -> Options:
    """The options as the environment sets them now (cheap: a dozen dictionary lookups)."""
    return Options.from_env()
