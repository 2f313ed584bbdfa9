"""The names of the registered ops (``qsparse::<name>``): the one list every table derives from."""

OP_NAMES = (
    "topk_sparsify",
    "block_topk_sparsify",
    "sparse_linear",
    "quantize_act_int8",
    "quantize_weight_ternary",
    "pack_ternary",
    "unpack_ternary",
    "ternary_linear",
)
