"""The pack's nodes (thin: the method lives in pva/)."""

from .apply import PVAApply
from .crops import PVACropFaces, PVAPasteFaces
from .faces import PVADetectFaces, PVAFaceRegionMask
from .identity import PVAEncodeIdentity
from .loaders import PVAFaceNetLoader, PVAInitializeFromModel, PVAModelLoader
from .personalize import PVAQuickPersonalize
from .prompt import PVAEncodePrompt
from .save import PVASaveModel
from .similarity import PVAIdentitySimilarity

NODES = [
    PVAFaceNetLoader,
    PVAModelLoader,
    PVAInitializeFromModel,
    PVAEncodeIdentity,
    PVAApply,
    PVADetectFaces,
    PVAFaceRegionMask,
    PVACropFaces,
    PVAPasteFaces,
    PVAQuickPersonalize,
    PVAEncodePrompt,
    PVASaveModel,
    PVAIdentitySimilarity,
]
