"""Drop-in Q-Sparse modules. They hold parameters and call the functional ops; no kernel math here.

* :class:`QSparseLinear`: ``nn.Linear`` with top-K (or N:M) input sparsity, STE backward.
* :class:`BitLinear`: BitNet b1.58 (fake-quantized training, packed ternary inference), optional top-K.
* :class:`ReLU2` / :func:`relu2`: squared ReLU; :class:`ReLU2GLU`: the Q-Sparse FFN block.
* :class:`DenseHead`: the dense output head (``lm_head``) through the library's GEMV (``convert`` makes it).
* :class:`RMSNorm`: HF Llama's RMSNorm in one CPU kernel call (``convert`` makes it).
* :class:`SiblingGroup`: sibling layers (q/k/v, gate/up) computed with one kernel call (``convert`` makes them).
"""

from ._siblings import SiblingGroup
from .activations import ReLU2, relu2
from .bitlinear import BitLinear
from .dense_head import DenseHead
from .fake_quant import fake_quant_act, fake_quant_weight
from .ffn import ReLU2GLU
from .linear import QSparseLinear
from .rms_norm import RMSNorm

__all__ = [
    "QSparseLinear",
    "BitLinear",
    "ReLU2",
    "relu2",
    "ReLU2GLU",
    "fake_quant_act",
    "fake_quant_weight",
    "SiblingGroup",
    "DenseHead",
    "RMSNorm",
]
