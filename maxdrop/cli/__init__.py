"""The ``maxdrop`` command (``app.py``: LightningCLI and the entry point; ``errors.py``: how bad input
and failed runs are reported; ``slots_command.py``: ``maxdrop slots``). See ``app.py`` for the commands."""

from maxdrop.cli.app import MaxdropCLI, main
from maxdrop.cli.errors import UsageError
from maxdrop.training.checkpoints import LastAndBestCheckpoint
from maxdrop.training.prediction_writer import PredictionWriter

__all__ = ["LastAndBestCheckpoint", "MaxdropCLI", "PredictionWriter", "UsageError", "main"]
