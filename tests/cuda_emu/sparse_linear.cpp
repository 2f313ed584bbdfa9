// sparse_linear.cu built for the host under the SIMT emulator (see simt_emulator.h).
#include "../../csrc/cuda/sparse_linear.cu"
