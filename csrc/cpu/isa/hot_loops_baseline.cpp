// The hot loops built for the extension's own target (baseline x86-64, or the host's arch elsewhere).
#define MMKERN_VARIANT baseline
#define MMKERN_VECTOR_BYTES 16
#include "hot_loops_variant.inc"
