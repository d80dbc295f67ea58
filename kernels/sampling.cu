// sampling.cu (being written)
#include "common.cuh"
