// quantize_act.cu built for the host under the SIMT emulator (see simt_emulator.h).
#include "../../csrc/cuda/quantize_act.cu"
