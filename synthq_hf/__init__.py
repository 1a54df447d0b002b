"""synthq-hf: grounded synthetic instructions (SynthQuestions) as composable Hugging Face ``datasets`` stages."""

from synthq_hf import stages
from synthq_hf.endpoint import EndpointConfig, EndpointError, RequestFailed

__version__ = "0.1.0"
__all__ = ["EndpointConfig", "EndpointError", "RequestFailed", "__version__", "stages"]
