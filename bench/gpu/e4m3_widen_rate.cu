// Widening rate of e4m3 pairs on the GPU (bench/gpu/NOTES.md run 63): the hardware conversion
// (cvt.rn.f16x2.e4m3x2, F2FP in SASS) against moving bits with integer instructions (the value
// * 2^-8 read as f16, seven instructions per four values). Each thread widens eight independent
// 4-byte words per step; the figure to read is Gwords/s (4-byte words widened per second).
// Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90a -o /tmp/widen bench/gpu/e4m3_widen_rate.cu && /tmp/widen
#include <cstdio>
#include <cuda_runtime.h>
typedef unsigned int u32;
__device__ __forceinline__ u32 cvt(u32 x) { u32 r; unsigned short p = (unsigned short)x; asm volatile("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(p)); return r; }
__device__ __forceinline__ void bits(u32 x, u32& e, u32& o) {
    o = (x & 0x80008000u) | ((x & 0x7f007f00u) >> 1);
    const u32 y = x << 8;
    e = (y & 0x80008000u) | ((y & 0x7f007f00u) >> 1);
}
template <int MODE>
__global__ void k(u32* out, int n, u32 seed) {
    u32 v[8];
    for (int i = 0; i < 8; ++i) v[i] = seed * (threadIdx.x + 1) + i * 0x01010101u;
    u32 acc = 0;
    long long t0 = clock64();
    for (int it = 0; it < n; ++it) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            if (MODE == 0) { u32 a = cvt(v[i]), b = cvt(v[i] >> 16); v[i] = a ^ b; }  // 2 F2FP + 1 LOP per 4 bytes
            else { u32 a, b; bits(v[i], a, b); v[i] = a ^ b; }
        }
    }
    long long t1 = clock64();
    for (int i = 0; i < 8; ++i) acc ^= v[i];
    out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
    if (threadIdx.x == 0 && blockIdx.x == 0) out[1 << 20] = (u32)(t1 - t0);
}
int main() {
    u32* d; cudaMalloc(&d, (1 << 20) * 4 + 64);
    int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    const int n = 4096;
    for (int mode = 0; mode < 2; ++mode)
        for (int warps = 4; warps <= 32; warps *= 2) {
            auto f = mode ? k<1> : k<0>;
            f<<<sms, warps * 32>>>(d, n, 3);
            cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
            cudaEventRecord(a); f<<<sms, warps * 32>>>(d, n, 5); cudaEventRecord(b); cudaEventSynchronize(b);
            float ms; cudaEventElapsedTime(&ms, a, b);
            u32 cyc; cudaMemcpy(&cyc, d + (1 << 20), 4, cudaMemcpyDeviceToHost);
            double words = (double)sms * warps * 32 * n * 8;  // 4-byte words widened
            printf("%s warps/SM %2d: %.3f ms, %.2f Gwords/s, %.3f SM-clk per warp-word (cycles of block 0: %u)\n",
                   mode ? "bits" : "cvt ", warps, ms, words / ms / 1e6, (double)cyc / (n * 8.0) / warps, cyc);
        }
    return 0;
}
