"""Lightning callbacks of a gazelit training run."""

from callbacks.checkpointing import AtomicModelCheckpoint, is_complete_checkpoint, latest_checkpoint
from callbacks.interrupt import InterruptReport
from callbacks.k_schedule import KSchedule, ProgressiveTopK
from callbacks.progress import StepBoundedProgressBar, progress_bar
from callbacks.rng_state import RNGStateCheckpoint
from callbacks.routing_image import RoutingImageLogger
from callbacks.stream_resume import StreamResumeAcrossWorldSizes

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
