// Version and status strings of the C ABI.
#include "common.cuh"

extern "C" int ril_abi_version(void) { return RIL_ABI_VERSION; }

extern "C" const char* ril_status_string(int status) {
  switch (status) {
    case RIL_OK:
      return "ok";
    case RIL_ERR_INVALID_ARGUMENT:
      return "invalid argument (null pointer, negative size, bad stride or prediction type)";
    case RIL_ERR_UNSUPPORTED:
      return "unsupported problem size for these kernels";
    default:
      break;
  }
  if (status >= RIL_ERR_CUDA_BASE) return cudaGetErrorString(static_cast<cudaError_t>(status - RIL_ERR_CUDA_BASE));
  return "unknown status";
}
