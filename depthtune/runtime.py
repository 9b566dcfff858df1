"""Process-wide settings: offline by default, quiet, deterministic, right device."""
from __future__ import annotations

import os
import random
import sys
import warnings

# Offline defaults (shared/STACK.md): nothing waits on the network. A user who is
# online and wants the Hub sets HF_HUB_OFFLINE=0 explicitly.
PROCESS_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # Progress bars: huggingface_hub's switch also turns off transformers' ("Loading weights",
    # "Writing model shards"): transformers.utils.logging reads hub's state when it is imported.
    # datasets has its own ("tokenizing train", "Saving the dataset (1/1 shards)").
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no progress bars in stage logs
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",  # read when transformers configures its logging
    # A dead tracking server must cost seconds, not minutes of urllib3 retries with backoff.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # no "Validating input example ..." lines in stage logs
}


def is_offline() -> bool:
    """The one offline check: HF_HUB_OFFLINE set to 1/true/yes/on (what huggingface_hub accepts)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def configure_process() -> None:
    """Set up a depthtune process: offline + quiet environment defaults, warnings filters.

    Called once by every entry point (stage runner, CLI, flows, tests); importing a
    depthtune module changes nothing in the process.
    """
    for k, v in PROCESS_ENV.items():
        os.environ.setdefault(k, v)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # These libraries read the environment above once, at import. One already imported is
    # switched directly (its public calls); one not imported is not imported here (transformers
    # alone costs ~1.3 s, and prepare, compare, promote never use it).
    # A user's explicit HF_*_DISABLE_PROGRESS_BARS=0 wins (and the libraries would warn otherwise).
    hub_bars_off = os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    if hub_bars_off and "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        if hub_bars_off:
            hf_logging.disable_progress_bar()
    if os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1" and "datasets" in sys.modules:
        import datasets
        datasets.disable_progress_bars()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(requested: str) -> str:
    import torch

    from depthtune.errors import ConfigError

    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available (use auto or cpu)")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def set_threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)
