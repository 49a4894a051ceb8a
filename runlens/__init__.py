"""runlens: record training dynamics of PyTorch runs and find their failure modes.

Importing ``runlens`` does not import torch. ``runlens.record`` imports it on first use,
so the analyzer runs on machines without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from runlens.recorder.recorder import Recorder


def record(run_dir: str, **options: Any) -> "Recorder":
    """Open a run directory for recording and return the `Recorder`.

    Use it as a context manager around the training loop. The keyword arguments are
    those of `runlens.recorder.recorder.Recorder`. Raises ModuleNotFoundError when torch
    is not installed.
    """
    try:
        from runlens.recorder.recorder import Recorder
    except ModuleNotFoundError as error:
        if error.name != "torch" and not (error.name or "").startswith("torch."):
            raise
        raise ModuleNotFoundError(
            "runlens.record needs torch, which is not installed. Install it with "
            "pip install 'runlens[torch]'. The analyzer (runlens analyze) works without it.",
            name="torch") from error

    return Recorder(run_dir, **options)


__all__ = ["record", "__version__"]
