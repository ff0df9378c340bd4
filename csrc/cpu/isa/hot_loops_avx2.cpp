// The hot loops built for AVX2 + FMA + F16C (x86-64-v3), run where the host has it (isa.cpp).
#define MMKERN_VARIANT avx2
#define MMKERN_VECTOR_BYTES 32
#define MMKERN_TARGET "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#include "hot_loops_variant.inc"
