"""Errors a user can act on. Each message names the input and says what to do."""


class PVAError(ValueError):
    """Bad input to a PVA node or function; the message is meant for the ComfyUI user."""


class PVAWeightsError(PVAError):
    """A PVA or FaceNet weights file is missing, truncated, or made for another model."""


class NoFaceFoundError(PVAError):
    """MTCNN found no face in a reference photo."""
