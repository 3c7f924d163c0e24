"""Errors that TuckerSegment reports to users: each names the problem and the fix."""


class TuckerSegmentError(Exception):
    """Base class for every error meant for the user (CLI prints the message, no traceback)."""


class ModelFolderError(TuckerSegmentError):
    """The folder is not a usable nnU-Net v2 trained model folder."""


class DeviceError(TuckerSegmentError):
    """A device name that is not one, or a device this machine does not have."""


class RecoveryError(TuckerSegmentError):
    """A recovery run (distillation, fine-tuning) cannot run as asked."""


class ProtocolError(TuckerSegmentError):
    """What a worker or its client read is not part of the protocol (a message, a transfer file)."""


class CheckpointError(TuckerSegmentError):
    """A checkpoint or weights file cannot be read or does not fit the architecture."""


class RankMismatchError(TuckerSegmentError):
    """A recorded decomposition (tucker.json) does not fit the network built from the plans."""


class PolicyError(TuckerSegmentError):
    """A rank policy was given invalid parameters."""


class DecompositionError(TuckerSegmentError):
    """A layer cannot be decomposed as requested."""


class OutputPathError(TuckerSegmentError):
    """The output location cannot be written."""


class VolumeError(TuckerSegmentError):
    """The input image cannot be segmented (not 3D, empty, not finite, unreadable): a batch skips it."""


class Cancelled(TuckerSegmentError):
    """The user cancelled a running job; nothing was written."""


class SegmentationCancelled(Cancelled):
    """The user cancelled a running segmentation; nothing was written."""


class Interrupted(BaseException):  # noqa: N818 (not an error: a request to stop)
    """SIGINT or SIGTERM reached a command-line run. A ``BaseException``, so nothing on the way mistakes it for
    a bad input: it unwinds every writer (their partial outputs removed) up to ``cli.main``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.kept = ""  # what the stopped work saved, when it saved something to resume from


class TaskError(TuckerSegmentError):
    """The task cannot run as asked: no model, models that do not fit together, unknown structures."""


class NotEnoughMemoryError(TuckerSegmentError):
    """Out of memory with nothing smaller to fall back to (GPU), or too little RAM even in slabs (CPU)."""


class CacheWarning(UserWarning):
    """A cached artefact failed its check (changed since written, unreadable) and is being built again."""
