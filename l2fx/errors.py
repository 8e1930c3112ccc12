"""Every error l2fx raises on purpose is an :class:`L2fxError`.

The subclasses name the kind of problem so that callers can catch what they can handle
(a corrupted file differs from an unreachable target) and so that the message, not a
traceback deep inside torch, tells the user what to fix.
"""
from __future__ import annotations


class L2fxError(Exception):
    """Base class of all errors raised by l2fx."""


class ConfigError(L2fxError, ValueError):
    """A configuration value is invalid (e.g. a negative resolution, an unknown kind)."""


class TargetCRError(ConfigError):
    """``target_cr`` is <= 1 or outside the range this model can reach."""


class CalibrationError(L2fxError, ValueError):
    """Calibration data is missing, empty, or not shaped as the model expects."""


class NonFiniteWeightError(L2fxError, ValueError):
    """A parameter holds NaN or inf; the message names the parameter."""


class NoCompressibleLayersError(L2fxError, ValueError):
    """The model has no Conv/Linear/Embedding weight that l2fx can compress."""


class CaptureError(L2fxError):
    """Neither torch.fx.symbolic_trace nor torch.export could capture the model."""


class PassError(L2fxError):
    """A pass's precondition or postcondition failed; the message names the pass."""


class VerifierError(PassError):
    """The IR verifier found a broken invariant after a pass; names the pass and the node."""


class ArtifactError(L2fxError):
    """An artifact file cannot be read or written."""


class CorruptArtifactError(ArtifactError):
    """Checksum mismatch, truncation, or malformed content."""


class ArtifactVersionError(ArtifactError):
    """The artifact was written by an incompatible format version."""


class ArchitectureMismatchError(ArtifactError):
    """The model passed to :func:`l2fx.load` is not the architecture the artifact was made from."""


class SolverError(L2fxError):
    """A layer-wise solver (GPTQ, SparseGPT, OBC, ...) cannot apply to a layer as asked; names the layer/option."""


class FormatError(ConfigError):
    """A block format or sparsity pattern cannot represent a tensor as asked (e.g. a dimension
    not divisible by the block or by M of N:M); names the tensor, the dimension and the option."""


class BackendError(L2fxError):
    """A requested runtime backend (e.g. Triton) is unavailable or unsupported for a layer."""
