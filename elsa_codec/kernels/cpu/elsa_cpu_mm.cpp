// ELSA sparse levels on the CPU: the products written once for two vector widths (M > 1 for every
// packed format, and the nm format's M = 1 product). Built together with elsa_cpu.cpp (its header
// comment describes the formats) by elsa_codec/native.py; the PyTorch references are in
// elsa_codec/kernels/cpu/packed.py.
//
// x arrives as panels xp `[P, Kp, W]` float32: panel p holds columns p*W .. p*W + W - 1 of x^T
// (W = 16, 32, 48 or 64, zero padded past M), so a kept weight's update reads W contiguous floats.
// y `[M, ldy]` float32 (+ bias float32 `[N]`); values keep the weight's dtype (dt 0 = float32,
// 1 = bfloat16, 2 = float16), accumulated in float32. Run-time dispatch: the AVX-512 instance where
// elsa_cpu_isa() says 2, else the 8-lane one (AVX2 where the build has it).
#include <cstdint>
#include <cstring>
#include <omp.h>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "elsa_cpu_common.h"

extern "C" int elsa_cpu_isa();

#define ELSA_VL 8
#define ELSA_NS v8
#include "elsa_cpu_mm.inc"
#undef ELSA_VL
#undef ELSA_NS

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")
#define ELSA_VL 16
#define ELSA_NS v16
#include "elsa_cpu_mm.inc"
#undef ELSA_VL
#undef ELSA_NS
#pragma GCC pop_options
#define ELSA_HAS_V16 1
#else
#define ELSA_HAS_V16 0
#endif

namespace {

inline bool wide(int64_t W = 16) { return ELSA_HAS_V16 && elsa_cpu_isa() >= 2 && W % 16 == 0; }

// Every panel of x in turn (outer loop), all rows of the weight per panel.
template <typename F>
void over_panels(int64_t M, int64_t W, int64_t Kp, double dens, const float* xp, const float* bias, float* y, int64_t ldy,
                 F f) {
    for (int64_t m0 = 0, q = 0; m0 < M; m0 += W, q++) {
        v8::Panel p8{xp + q * Kp * W, W, m0, M, bias, y, ldy, Kp, dens};
#if ELSA_HAS_V16
        v16::Panel p16{xp + q * Kp * W, W, m0, M, bias, y, ldy, Kp, dens};
        f(p8, p16);
#else
        f(p8, p8);
#endif
    }
}

}  // namespace

extern "C" {

// csr: row n's entries are [rowptr[g ld + n], rowend[g ld + n]) of each segment g < nseg (a plain
// level: one segment, rowend = rowptr + 1).
void elsa_csr_mm(int64_t N, int64_t M, int64_t W, int64_t Kp, const int64_t* rowptr, const int64_t* rowend, int nseg,
                 int64_t ld, const void* col, int isz, const void* val, int dt, const float* xp, const float* bias,
                 float* y, int64_t ldy, int nt) {
    const int64_t entries = csr_entries(N, rowptr, rowend, nseg, ld), work = entries * W;
    over_panels(M, W, Kp, (double)entries / ((double)N * Kp + 1), xp, bias, y, ldy, [&](const v8::Panel& p8, const auto& p16) {
        over_rows(N, nt, work, [&](int64_t n0, int64_t n1) {
#if ELSA_HAS_V16
            if (wide(W)) { v16::csr(n0, n1, rowptr, rowend, nseg, ld, col, isz, val, dt, p16); return; }
#endif
            (void)p16;
            v8::csr(n0, n1, rowptr, rowend, nseg, ld, col, isz, val, dt, p8);
        });
    });
}

void elsa_bitmask_mm(int64_t N, int64_t M, int64_t W, int64_t Kp, int64_t KB, const int64_t* rowptr,
                     const uint8_t* mask, const void* val, int dt, const float* xp, const float* bias, float* y,
                     int64_t ldy, int nt) {
    over_panels(M, W, Kp, (double)rowptr[N] / ((double)N * Kp + 1), xp, bias, y, ldy, [&](const v8::Panel& p8, const auto& p16) {
        over_rows(N, nt, rowptr[N] * W, [&](int64_t n0, int64_t n1) {
#if ELSA_HAS_V16
            if (wide(W)) { v16::bitmask(n0, n1, KB, rowptr, mask, val, dt, p16); return; }
#endif
            (void)p16;
            v8::bitmask(n0, n1, KB, rowptr, mask, val, dt, p8);
        });
    });
}

// nm: idx uint8 `[N, E]`, val `[N * E + 8]` (E = ceil(K / m) * n entries per row).
void elsa_nm_mm(int64_t N, int64_t M, int64_t W, int64_t Kp, int64_t E, int n, int m, const uint8_t* idx,
                const void* val, int dt, const float* xp, const float* bias, float* y, int64_t ldy, int nt) {
    over_panels(M, W, Kp, (double)n / m, xp, bias, y, ldy, [&](const v8::Panel& p8, const auto& p16) {
        over_rows(N, nt, N * E * W, [&](int64_t n0, int64_t n1) {
#if ELSA_HAS_V16
            if (wide(W)) { v16::nm(n0, n1, E, n, m, idx, val, dt, p16); return; }
#endif
            (void)p16;
            v8::nm(n0, n1, E, n, m, idx, val, dt, p8);
        });
    });
}

void elsa_bsr_mm(int64_t N, int64_t M, int64_t W, int64_t Kp, int64_t R, int64_t R8, int64_t C,
                 const int64_t* browptr, const int32_t* bcol, const void* bval, int dt, const float* xp,
                 const float* bias, float* y, int64_t ldy, int nt) {
    int64_t NBR = (N + R - 1) / R;
    over_panels(M, W, Kp, 1.0, xp, bias, y, ldy, [&](const v8::Panel& p8, const auto& p16) {
        over_rows(NBR, nt, browptr[NBR] * R8 * C * W, [&](int64_t b0, int64_t b1) {
#if ELSA_HAS_V16
            if (wide(W)) { v16::bsr(b0, b1, N, R, R8, C, browptr, bcol, bval, dt, p16); return; }
#endif
            (void)p16;
            v8::bsr(b0, b1, N, R, R8, C, browptr, bcol, bval, dt, p8);
        });
    });
}

// nm, M = 1: x `[K]`, y `[N]`.
void elsa_nm_mv(int64_t N, int64_t E, int n, int m, const uint8_t* idx, const void* val, int dt, const float* x,
                const float* bias, float* y, int nt) {
    over_rows(N, nt, N * E, [&](int64_t n0, int64_t n1) {
#if ELSA_HAS_V16
        if (wide()) { v16::nm_mv(n0, n1, E, n, m, idx, val, dt, x, bias, y); return; }
#endif
        v8::nm_mv(n0, n1, E, n, m, idx, val, dt, x, bias, y);
    });
}

}  // extern "C"
