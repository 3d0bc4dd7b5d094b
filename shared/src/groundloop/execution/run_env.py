"""The environment a sandboxed run gets: the runner's, reduced to an allow-list.

Locale, paths, thread counts and device selection pass; credentials (by name, and every cloud
or model SDK prefix) and the runner's own GROUNDLOOP_* settings never do, even when a caller
passes them explicitly. Split from `groundloop.execution.sandbox`, which re-exports it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("groundloop.execution.sandbox")

# Variables a run may inherit from the runner: locale, paths, thread counts, device selection.
_ALLOWED_NAMES = {
    "PATH",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TERM",
    "USER",
    "LOGNAME",
    "SHELL",
    "PYTHONHASHSEED",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONIOENCODING",
    "PYTHONUTF8",
    "PYTHONPATH",
    "PYTHONWARNINGS",
    "PYTHONFAULTHANDLER",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "CUDA_HOME",
    "CUDA_PATH",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
}
_ALLOWED_PREFIXES = ("LC_", "NCCL_", "TORCH_", "CUBLAS_", "CUDNN_")
# Denied even when allowed above or passed in `extra`: credentials by name, cloud SDK config.
_SECRET = re.compile(
    r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|SESSION_KEY|AUTH)"
    r"|^(AWS|GOOGLE|GCLOUD|GCP|AZURE|OPENAI|ANTHROPIC|HF|HUGGING_?FACE|WANDB|GITHUB|GH|NATS)_",
    re.IGNORECASE,
)
# The run's own variables; any other GROUNDLOOP_* (broker URL, DB URL, keys) stays out.
RUN_VARIABLES = {
    "GROUNDLOOP_SEED",
    "GROUNDLOOP_DEVICE",
    "GROUNDLOOP_METRICS_OUT",
    "GROUNDLOOP_SPLIT",
    "GROUNDLOOP_CACHE_DIR",
    "GROUNDLOOP_SMOKE",
}


def allowed_environment(extra: dict[str, str], home: Path) -> dict[str, str]:
    """The runner's environment reduced to the allow-list, HOME=`home`, plus `extra`.

    `extra` is the run's own settings (GROUNDLOOP_SEED, …, CUDA_VISIBLE_DEVICES); secrets and
    GROUNDLOOP_* service settings are dropped from it too, so a caller cannot leak them.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if (name in _ALLOWED_NAMES or name.startswith(_ALLOWED_PREFIXES))
        and not _SECRET.search(name)
    }
    for name, value in extra.items():
        if _SECRET.search(name) or (name.startswith("GROUNDLOOP_") and name not in RUN_VARIABLES):
            log.warning("sandbox: not passing %s to the run (secret or service setting)", name)
            continue
        env[name] = str(value)
    env["HOME"] = str(home)
    return env
