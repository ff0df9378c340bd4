// The hot loops built for AVX-512 F/BW/VL/DQ (x86-64-v4), run where the host has it (isa.cpp).
#define MMKERN_VARIANT avx512
#define MMKERN_VECTOR_BYTES 64
#define MMKERN_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#include "hot_loops_variant.inc"
