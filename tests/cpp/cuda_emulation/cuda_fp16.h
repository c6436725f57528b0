// __half comes with cuda_runtime.h in the emulation
#pragma once
#include "cuda_runtime.h"
