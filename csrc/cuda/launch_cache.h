// Host-side caches for the CUDA queries the launchers made on every call: the device's
// properties (cudaDeviceGetAttribute) and the opt-in to more than 48 KB of dynamic shared
// memory per kernel (cudaFuncSetAttribute).
//
// Why: at short sequences (L = 50..200) a training step is bound by host time, and every
// step of the fused short path paid 3 cudaFuncSetAttribute and 3 cudaDeviceGetAttribute
// calls (plus cudaGetDevice) whose answers never change for a given device. Both are now
// asked once per device (once per kernel and device for the opt-in); what remains per call
// is cudaGetDevice (a thread-local read in the runtime) and, for the opt-in, an
// uncontended lock and a map look-up. Thread-safe. Host code only.
//
// Assumption: nothing resets a device's context (cudaDeviceReset) while the process runs;
// the opt-in is a property of the kernel in that context and would be lost with it.
#pragma once
#include <cuda_runtime_api.h>

#include <atomic>
#include <map>
#include <mutex>
#include <utility>

namespace blossom {
namespace gpu {
namespace detail {

// Device indices cached; a larger index is queried on every call (still correct).
constexpr int kCachedDevices = 64;

struct DeviceInfo {
  int major = 0;           // compute capability major
  int sms = 0;             // multiprocessors
  int max_smem_optin = 0;  // dynamic shared memory per block a kernel may opt into
};

// The current device's properties. False when a CUDA query failed: the error is left for
// the caller to clear or report, as a direct query would leave it, and nothing is cached.
inline bool current_device_info(DeviceInfo& out) {
  static std::atomic<bool> ready[kCachedDevices];  // zero-initialised (static storage)
  static DeviceInfo cached[kCachedDevices];
  static std::mutex mu;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  const bool cacheable = dev >= 0 && dev < kCachedDevices;
  if (cacheable && ready[dev].load(std::memory_order_acquire)) {
    out = cached[dev];
    return true;
  }
  DeviceInfo d;
  if (cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
          cudaSuccess)
    return false;
  if (cacheable) {
    const std::lock_guard<std::mutex> lock(mu);
    if (!ready[dev].load(std::memory_order_relaxed)) {
      cached[dev] = d;
      ready[dev].store(true, std::memory_order_release);
    }
  }
  out = d;
  return true;
}

// Opt-in shared memory per block of the current device, 0 when the query failed (what the
// launchers' former direct queries left in their zero-initialised variable).
inline int current_max_smem_optin() {
  DeviceInfo d;
  return current_device_info(d) ? d.max_smem_optin : 0;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device. Above
// the 48 KB every kernel gets, cudaFuncSetAttribute is called only when this (kernel,
// device) has not yet been granted at least `bytes`: a limit raised for a larger launch
// also covers the smaller ones (it is a maximum; each launch still states its own size,
// and results do not depend on it). A failed call is not recorded, and its error is left
// for the launch check (check_launch) to report, as before.
inline void opt_in_smem(const void* kernel, int bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> granted;  // (kernel, device) -> bytes
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = -1;  // never cached; try the call anyway
  const std::pair<const void*, int> key(kernel, dev);
  if (dev >= 0) {
    const std::lock_guard<std::mutex> lock(mu);
    const auto it = granted.find(key);
    if (it != granted.end() && it->second >= bytes) return;
  }
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) !=
          cudaSuccess ||
      dev < 0)
    return;
  const std::lock_guard<std::mutex> lock(mu);
  int& g = granted[key];
  if (bytes > g) g = bytes;
}

template <class K>
inline void opt_in_smem(K* kernel, int bytes) {
  opt_in_smem(reinterpret_cast<const void*>(kernel), bytes);
}

}  // namespace detail
}  // namespace gpu
}  // namespace blossom
