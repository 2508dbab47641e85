"""Stand-in for ``transformer_engine.pytorch.ops``: the names Megatron-Bridge's LoRA code
references (``Sequential`` appears in return annotations evaluated at import). Each class raises
when constructed; see ``transformer_engine.pytorch``'s docstring."""

from transformer_engine.pytorch import _Unavailable


class Sequential(_Unavailable):
    pass


class Linear(_Unavailable):
    pass


class LayerNorm(_Unavailable):
    pass


class RMSNorm(_Unavailable):
    pass


class Quantize(_Unavailable):
    pass


class MakeExtraOutput(_Unavailable):
    pass


class Dropout(_Unavailable):
    pass


class ConstantScale(_Unavailable):
    pass


class AddExtraInput(_Unavailable):
    pass
