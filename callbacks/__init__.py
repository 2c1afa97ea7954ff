"""Lightning callbacks of a gazelit training run."""

from gazelit.callbacks.checkpointing import AtomicModelCheckpoint, is_complete_checkpoint, latest_checkpoint
from gazelit.callbacks.interrupt import InterruptReport
from gazelit.callbacks.k_schedule import KSchedule, ProgressiveTopK
from gazelit.callbacks.progress import StepBoundedProgressBar, progress_bar
from gazelit.callbacks.rng_state import RNGStateCheckpoint
from gazelit.callbacks.routing_image import RoutingImageLogger
from gazelit.callbacks.stream_resume import StreamResumeAcrossWorldSizes

__all__ = [
    "AtomicModelCheckpoint",
    "InterruptReport",
    "KSchedule",
    "ProgressiveTopK",
    "RNGStateCheckpoint",
    "RoutingImageLogger",
    "StepBoundedProgressBar",
    "StreamResumeAcrossWorldSizes",
    "is_complete_checkpoint",
    "latest_checkpoint",
    "progress_bar",
]
