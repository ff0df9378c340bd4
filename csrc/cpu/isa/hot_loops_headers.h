#pragma once
// Every header csrc/cpu/isa/hot_loops.inc uses, included by each variant's file before its target
// pragma: inline functions and templates defined in them keep the baseline target, so no AVX code can
// stand in for a baseline copy of a shared inline function at link time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../../quantize_rules.h"
#include "hot_loops.h"
