// ELSA sparse levels on the CPU: packers (encoded weight -> packed level) and matrix products.
//
// ELSA (Halvachi et al., arXiv 2312.06872), section 2.2; DESIGN.md, "The code rule": level t keeps
// the weights whose code c (the k low bits of the IEEE-754 bit pattern) satisfies c < t, with their
// exact bits. Built by elsa_codec/native.py with g++ (-O3, -mavx2 -mfma -mf16c where the CPU has
// them, OpenMP) and called through ctypes from elsa_codec/kernels/cpu/packed.py, which holds the pure-PyTorch
// reference of every function here.
//
// Packed formats of one level of a weight W `[N, K]` (row n = output feature n):
//   csr     : rowptr int64 [N+1] (each row's entry count padded to a multiple of 8 with value 0 at
//             column 0), col uint16 or int32 [nnz], val [nnz + 8]; every csr kernel reads row n's
//             entries [rowptr[g ld + n], rowend[g ld + n]) of each segment g < nseg: a plain csr
//             level passes one segment and rowend = rowptr + 1, level t of the nested csr of
//             elsa_cpu_nested.cpp (every sparse level in one packed form) its t segments
//   bitmask : rowptr int64 [N+1] (unpadded), mask uint8 [N, KB] (bit j of byte b = column 8b+j kept),
//             val [nnz + 8]
//   bsr     : browptr int64 [NBR+1], bcol int32 [nblk], bval [nblk, C, R8] (R8 = R rounded up to 8;
//             a block of R x C weights stored column by column, zero padded at the edges)
//   nm      : an N:M level (at most n kept in each group of m consecutive columns): idx uint8 [N, E] and
//             val [N E + 8], E = ceil(K / m) n entries per row, n per group in column order; entry e of a
//             row is column (e / n) m + idx[e]; a group with fewer than n kept is padded with value 0
//             at offset 0. No row pointers: every row has E entries.
// Values keep the weight's dtype: dt 0 = float32, 1 = bfloat16, 2 = float16 (raw 16-bit patterns).
// Products take x as float32, accumulate in float32 and write float32: y `[M, N]` = x `[M, K]` W^T
// (+ bias float32 `[N]`). M = 1 runs the *_mv kernels on x `[K]` (padded as each format says);
// M > 1 runs the *_mm kernels of elsa_cpu_mm.cpp (register-blocked, AVX-512 or AVX2), which also
// holds the nm format's M = 1 product.
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

#include "elsa_cpu_common.h"

// Software prefetch distance of the value stream, in elements (measured: 64 -> 2048 took the float32
// bitmask product at 50% density from 1.04x to 0.65x of dense F.linear on a 2-core Xeon VM).
#ifndef ELSA_PF
#define ELSA_PF 2048
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define ELSA_AVX2 1
#else
#define ELSA_AVX2 0
#endif

typedef float v8f __attribute__((vector_size(32)));

namespace {

// -- scalars and 8-lane loads of stored values -----------------------------------------------------
inline float f16_to_f32(uint16_t h) {
#if ELSA_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        if (m == 0) { u = s; }
        else { e = 113; while (!(m & 0x400)) { m <<= 1; e--; } m &= 0x3ff; u = s | (e << 23) | (m << 13); }
    } else if (e == 31) { u = s | 0x7f800000u | (m << 13); }
    else { u = s | ((e + 112) << 23) | (m << 13); }
    float f; std::memcpy(&f, &u, 4); return f;
#endif
}

inline float load1(const void* v, int dt, int64_t i) {
    if (dt == 0) return ((const float*)v)[i];
    uint16_t h = ((const uint16_t*)v)[i];
    if (dt == 1) { uint32_t u = (uint32_t)h << 16; float f; std::memcpy(&f, &u, 4); return f; }
    return f16_to_f32(h);
}

#if ELSA_AVX2
inline __m256 load8(const void* v, int dt, int64_t i) {
    if (dt == 0) return _mm256_loadu_ps((const float*)v + i);
    __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)v + i));
    if (dt == 1) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

inline float hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

// compress[b]: lane i holds the position of the i-th set bit of b (unused lanes 0);
// prefix[p]: lanes < p all ones.
alignas(32) int32_t compress_tab[256][8];
alignas(32) int32_t prefix_tab[9][8];
struct Tables {
    Tables() {
        for (int b = 0; b < 256; b++) {
            int p = 0;
            for (int j = 0; j < 8; j++) compress_tab[b][j] = 0;
            for (int j = 0; j < 8; j++) if (b >> j & 1) compress_tab[b][p++] = j;
        }
        for (int p = 0; p <= 8; p++) for (int j = 0; j < 8; j++) prefix_tab[p][j] = j < p ? -1 : 0;
    }
} tables;
#endif

inline bool kept(const void* w, int es, int64_t i, uint32_t low, uint32_t t) {
    uint32_t u = es == 4 ? ((const uint32_t*)w)[i] : ((const uint16_t*)w)[i];
    return (u & low) < t;
}

inline void copy_val(void* dst, int64_t j, const void* w, int es, int64_t i) {
    if (es == 4) ((uint32_t*)dst)[j] = ((const uint32_t*)w)[i];
    else ((uint16_t*)dst)[j] = ((const uint16_t*)w)[i];
}

// csr: x `[K]`; rows padded to multiples of 8 entries: one 8-lane gather of x per 8 entries.
// Row n is the entries [rowptr[g ld + n], rowend[g ld + n]) of each segment g < nseg (csr_entries).
template <int DT, typename IDX>
void csr_mv_rows(int64_t n0, int64_t n1, const int64_t* rowptr, const int64_t* rowend, int nseg, int64_t ld,
                 const IDX* col, const void* val, const float* x, const float* bias, float* y) {
    for (int64_t n = n0; n < n1; n++) {
        float s = 0.f, tail = 0.f;
#if ELSA_AVX2
        auto cols = [&](int64_t o) {
            if (sizeof(IDX) == 2) return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(col + o)));
            return _mm256_loadu_si256((const __m256i*)(col + o));
        };
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
#endif
        for (int g = 0; g < nseg; g++) {
            int64_t i = rowptr[g * ld + n], e = rowend[g * ld + n];
#if ELSA_AVX2
            for (; i + 16 <= e; i += 16) {
                _mm_prefetch((const char*)val + (i + ELSA_PF) * (DT == 0 ? 4 : 2), _MM_HINT_T0);
                _mm_prefetch((const char*)(col + i + ELSA_PF), _MM_HINT_T0);
                a0 = _mm256_fmadd_ps(load8(val, DT, i), _mm256_i32gather_ps(x, cols(i), 4), a0);
                a1 = _mm256_fmadd_ps(load8(val, DT, i + 8), _mm256_i32gather_ps(x, cols(i + 8), 4), a1);
            }
            if (i + 8 <= e) {
                a0 = _mm256_fmadd_ps(load8(val, DT, i), _mm256_i32gather_ps(x, cols(i), 4), a0);
                i += 8;
            }
#endif
            for (; i < e; i++) tail += load1(val, DT, i) * x[col[i]];
        }
#if ELSA_AVX2
        s = hsum(_mm256_add_ps(a0, a1));
#endif
        y[n] = s + tail + (bias ? bias[n] : 0.f);
    }
}

// The mask bytes j .. KB of a row (after the vector loop), one kept weight at a time, added to s.
template <int DT>
inline float bitmask_tail(float s, int64_t j, int64_t KB, int64_t i, const uint8_t* mb, const void* val, const float* x) {
    for (; j < KB; j++)
        for (unsigned b = mb[j]; b; b &= b - 1) s += load1(val, DT, i++) * x[8 * j + __builtin_ctz(b)];
    return s;
}

// bitmask: x `[8 KB]` (zero padded past K). Four mask bytes (32 columns) per step: each byte
// compresses its 8 inputs to the positions of its kept weights (one permute), multiplied with the
// next popcount values (lanes past it masked off).
template <int DT>
void bitmask_mv_rows(int64_t n0, int64_t n1, int64_t KB, const int64_t* rowptr, const uint8_t* mask, const void* val,
                     const float* x, const float* bias, float* y) {
    for (int64_t n = n0; n < n1; n++) {
        int64_t i = rowptr[n];
        const uint8_t* mb = mask + n * KB;
        float s = 0.f;
        int64_t j = 0;
#if ELSA_AVX2
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; j + 4 <= KB; j += 4) {
            uint32_t w;
            std::memcpy(&w, mb + j, 4);
            unsigned b0 = w & 255, b1 = (w >> 8) & 255, b2 = (w >> 16) & 255, b3 = w >> 24;
            int p0 = __builtin_popcount(b0), p1 = __builtin_popcount(b1), p2 = __builtin_popcount(b2);
            const float* xj = x + 8 * j;
            _mm_prefetch((const char*)(mb + j + 512), _MM_HINT_T0);
            _mm_prefetch((const char*)val + (i + ELSA_PF) * (DT == 0 ? 4 : 2), _MM_HINT_T0);
#define ELSA_BM_STEP(A, B, P, OFF, XO)                                                                  \
    A = _mm256_fmadd_ps(_mm256_and_ps(load8(val, DT, i + OFF), _mm256_load_ps((const float*)prefix_tab[P])), \
                        _mm256_permutevar8x32_ps(_mm256_loadu_ps(xj + XO), _mm256_load_si256((const __m256i*)compress_tab[B])), A)
            ELSA_BM_STEP(a0, b0, p0, 0, 0);
            ELSA_BM_STEP(a1, b1, p1, p0, 8);
            ELSA_BM_STEP(a2, b2, p2, p0 + p1, 16);
            ELSA_BM_STEP(a3, b3, __builtin_popcount(b3), p0 + p1 + p2, 24);
#undef ELSA_BM_STEP
            i += __builtin_popcount(w);
        }
        s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
        y[n] = bitmask_tail<DT>(s, j, KB, i, mb, val, x) + (bias ? bias[n] : 0.f);
    }
}

// bsr, M = 1: rows r0 .. r0 + 8 NV of block row br, NV accumulators of 8 rows held in registers;
// each kept block is read once, column by column (R8 values), prefetched ahead.
struct BsrRow {
    int64_t br, r0, R, R8, C, N;
    const int64_t* browptr;
    const int32_t* bcol;
    const void* bval;
    const float* x;
    const float* bias;
    float* y;
};

template <int DT, int NV>
void bsr_mv_rows(const BsrRow& a) {
    v8f acc[NV];
    for (int u = 0; u < NV; u++) acc[u] = (v8f){0, 0, 0, 0, 0, 0, 0, 0};
    const int es = DT == 0 ? 4 : 2;
    for (int64_t b = a.browptr[a.br]; b < a.browptr[a.br + 1]; b++) {
        const float* xb = a.x + (int64_t)a.bcol[b] * a.C;
        int64_t base = b * a.C * a.R8 + a.r0;
        for (int64_t c = 0; c < a.C; c++) {
            int64_t off = base + c * a.R8;
#if ELSA_AVX2
            _mm_prefetch((const char*)a.bval + off * es + 4096, _MM_HINT_T0);
            __m256 xs = _mm256_set1_ps(xb[c]);
            for (int u = 0; u < NV; u++) acc[u] = (v8f)_mm256_fmadd_ps(load8(a.bval, DT, off + 8 * u), xs, (__m256)acc[u]);
#else
            float xv = xb[c];
            for (int u = 0; u < NV; u++)
                for (int l = 0; l < 8; l++) acc[u][l] += load1(a.bval, DT, off + 8 * u + l) * xv;
#endif
        }
    }
    (void)es;
    for (int u = 0; u < NV; u++)
        for (int l = 0; l < 8; l++) {
            int64_t r = a.r0 + 8 * u + l, n = a.br * a.R + r;
            if (r < a.R && n < a.N) a.y[n] = acc[u][l] + (a.bias ? a.bias[n] : 0.f);
        }
}

template <int DT>
void bsr_mv_dispatch(int nv, const BsrRow& a) {
    switch (nv) {
        case 1: bsr_mv_rows<DT, 1>(a); break;
        case 2: bsr_mv_rows<DT, 2>(a); break;
        case 3: bsr_mv_rows<DT, 3>(a); break;
        case 4: bsr_mv_rows<DT, 4>(a); break;
        case 5: bsr_mv_rows<DT, 5>(a); break;
        case 6: bsr_mv_rows<DT, 6>(a); break;
        case 7: bsr_mv_rows<DT, 7>(a); break;
        default: bsr_mv_rows<DT, 8>(a); break;
    }
}

#if ELSA_AVX2
// bitmask, M = 1, AVX-512 (runtime-dispatched where the CPU has AVX-512 F/BW/VL/DQ and VBMI2): one
// masked expand-load puts a mask word's 16 kept values in their column lanes (zeros elsewhere).
#define ELSA_512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2")))
template <int DT>
ELSA_512 inline __m512 expand16(const void* val, int64_t i, __mmask16 m) {
    if (DT == 0) return _mm512_maskz_expandloadu_ps(m, (const float*)val + i);
    __m256i h = _mm256_maskz_expandloadu_epi16(m, (const uint16_t*)val + i);
    if (DT == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

template <int DT>
ELSA_512 void bitmask_mv_rows_512(int64_t n0, int64_t n1, int64_t KB, const int64_t* rowptr, const uint8_t* mask,
                                 const void* val, const float* x, const float* bias, float* y) {
    for (int64_t n = n0; n < n1; n++) {
        int64_t i = rowptr[n];
        const uint8_t* mb = mask + n * KB;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        int64_t j = 0;
        for (; j + 4 <= KB; j += 4) {
            uint32_t w;
            std::memcpy(&w, mb + j, 4);
            __mmask16 m0 = (__mmask16)(w & 0xffff), m1 = (__mmask16)(w >> 16);
            _mm_prefetch((const char*)val + (i + ELSA_PF) * (DT == 0 ? 4 : 2), _MM_HINT_T0);
            int p0 = __builtin_popcount(w & 0xffff);
            a0 = _mm512_fmadd_ps(expand16<DT>(val, i, m0), _mm512_loadu_ps(x + 8 * j), a0);
            a1 = _mm512_fmadd_ps(expand16<DT>(val, i + p0, m1), _mm512_loadu_ps(x + 8 * j + 16), a1);
            i += __builtin_popcount(w);
        }
        __m512 a = _mm512_add_ps(a0, a1);
        float s = hsum(_mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)));
        y[n] = bitmask_tail<DT>(s, j, KB, i, mb, val, x) + (bias ? bias[n] : 0.f);
    }
}
#endif

// Instruction set of the M = 1 bitmask kernel: 2 = AVX-512 (where the CPU has it), 1 = AVX2, 0 = scalar.
int detect_isa() {
#if ELSA_AVX2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vbmi2"))
        return 2;
    return 1;
#else
    return 0;
#endif
}
int isa = detect_isa();

inline bool fast_rows(int64_t cs) { return ELSA_AVX2 && isa >= 2 && cs == 1; }

// csr rows start at multiples of 8: zero a row's padding from entry i to the next multiple of 8.
inline void pad_csr(void* col, int isz, void* val, int es, int64_t i) {
    for (; i & 7; i++) {
        if (isz == 2) ((uint16_t*)col)[i] = 0; else ((int32_t*)col)[i] = 0;
        if (es == 4) ((uint32_t*)val)[i] = 0; else ((uint16_t*)val)[i] = 0;
    }
}

#if ELSA_AVX2
// 16 weights from w[i] (fewer at the row's end: `left`): their bits as epi32 and the kept mask.
ELSA_512 inline __mmask16 kept16(const void* w, int es, int64_t i, int64_t left, uint32_t low, uint32_t t, __m512i* bits) {
    __mmask16 tail = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    __m512i v = es == 4 ? _mm512_maskz_loadu_epi32(tail, (const uint32_t*)w + i)
                        : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail, (const uint16_t*)w + i));
    *bits = v;
    return _mm512_mask_cmplt_epu32_mask(tail, _mm512_and_si512(v, _mm512_set1_epi32((int)low)), _mm512_set1_epi32((int)t));
}

ELSA_512 int64_t count_row_512(const void* w, int es, int64_t base, int64_t K, uint32_t low, uint32_t t) {
    int64_t c = 0;
    __m512i bits;
    for (int64_t j = 0; j < K; j += 16) c += __builtin_popcount(kept16(w, es, base + j, K - j, low, t, &bits));
    return c;
}

// One row's kept values from entry i on (and their columns into col, isz bytes each, or their
// mask bits into mb, KB bytes); returns the entry after the row's last.
ELSA_512 int64_t pack_row_512(const void* w, int es, int64_t base, int64_t K, uint32_t low, uint32_t t, int64_t i,
                           void* col, int isz, void* val, uint8_t* mb, int64_t KB) {
    __m512i bits, iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t j = 0; j < K; j += 16) {
        __mmask16 m = kept16(w, es, base + j, K - j, low, t, &bits);
        if (mb) {
            mb[j >> 3] = (uint8_t)m;
            if ((j >> 3) + 1 < KB) mb[(j >> 3) + 1] = (uint8_t)(m >> 8);
        }
        // no branch on an empty group: at 10% density 1 group in 5 is empty, unpredictably
        // compress in a register, then a masked store (a compress-store to memory is microcoded
        // and slow on some CPUs, AMD Zen 4 among them)
        int c = __builtin_popcount(m);
        __mmask16 first = (__mmask16)((1u << c) - 1);
        __m512i kv = _mm512_maskz_compress_epi32(m, bits);
        if (es == 4) _mm512_mask_storeu_epi32((uint32_t*)val + i, first, kv);
        else _mm256_mask_storeu_epi16((uint16_t*)val + i, first, _mm512_cvtepi32_epi16(kv));
        if (col) {
            __m512i kc = _mm512_maskz_compress_epi32(m, _mm512_add_epi32(iota, _mm512_set1_epi32((int)j)));
            if (isz == 4) _mm512_mask_storeu_epi32((int32_t*)col + i, first, kc);
            else _mm256_mask_storeu_epi16((uint16_t*)col + i, first, _mm512_cvtepi32_epi16(kc));
        }
        i += c;
    }
    return i;
}
#endif

// Rows n0 .. n0 + nb - 1 (nb <= ELSA_TBLOCK) of a weight not stored by rows (cs != 1, e.g. transposed):
// column j of the block at once (contiguous when rs == 1: one memory page per column for 256 rows,
// so a memory-mapped weight's 4 KiB pages are not re-walked per 16 rows), emit(r, j, i) for each
// kept weight, in column order per row.
#if ELSA_AVX2
// block_kept where the block's column is contiguous (rs == 1) on an AVX-512 CPU: 16 codes compared
// per column, then one step per kept weight (no branch per weight).
template <typename EMIT>
ELSA_512 void block_kept_512(const void* w, int es, int64_t n0, int nb, int64_t K, int64_t cs, uint32_t low,
                             uint32_t t, EMIT emit) {
    __m512i vt = _mm512_set1_epi32((int)t), vlow = _mm512_set1_epi32((int)low);
    for (int64_t j = 0; j < K; j++)
        for (int r0 = 0; r0 < nb; r0 += 16) {
            int left = nb - r0;
            __mmask16 tail = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            int64_t i0 = n0 + r0 + j * cs;
            __m512i v = es == 4 ? _mm512_maskz_loadu_epi32(tail, (const uint32_t*)w + i0)
                                : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail, (const uint16_t*)w + i0));
            for (unsigned m = _mm512_mask_cmplt_epu32_mask(tail, _mm512_and_si512(v, vlow), vt); m; m &= m - 1) {
                int r = __builtin_ctz(m);
                emit(r0 + r, j, i0 + r);
            }
        }
}
#endif

#define ELSA_TBLOCK 256  // rows per block of a column-stored weight
#if ELSA_AVX2
// Kept weights per row of a column-stored block (rs == 1): one masked add of 16 row counters per
// 16 codes, no branch per weight.
ELSA_512 void count_block_512(const void* w, int es, int64_t n0, int nb, int64_t K, int64_t cs, uint32_t low,
                              uint32_t t, int64_t* count) {
    __m512i vt = _mm512_set1_epi32((int)t), vlow = _mm512_set1_epi32((int)low), one = _mm512_set1_epi32(1);
    __m512i acc[ELSA_TBLOCK / 16];
    int nsub = (nb + 15) / 16;
    for (int q = 0; q < nsub; q++) acc[q] = _mm512_setzero_si512();
    for (int64_t j = 0; j < K; j++)
        for (int q = 0; q < nsub; q++) {
            int left = nb - 16 * q;
            __mmask16 tail = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
            int64_t i0 = n0 + 16 * q + j * cs;
            __m512i v = es == 4 ? _mm512_maskz_loadu_epi32(tail, (const uint32_t*)w + i0)
                                : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail, (const uint16_t*)w + i0));
            __mmask16 m = _mm512_mask_cmplt_epu32_mask(tail, _mm512_and_si512(v, vlow), vt);
            acc[q] = _mm512_mask_add_epi32(acc[q], m, acc[q], one);
        }
    for (int q = 0; q < nsub; q++) {
        alignas(64) int32_t c[16];
        _mm512_store_si512((__m512i*)c, acc[q]);
        for (int l = 0; l < 16 && 16 * q + l < nb; l++) count[n0 + 16 * q + l] = c[l];
    }
}

// 16 x 16 transpose of 32-bit lanes in registers (unpack 32 / 64, then two 128-bit shuffles).
ELSA_512 inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; i++) {
            t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
}

// Rows n0 + r0 .. n0 + r0 + nr - 1 (nr <= 16) of a column-stored weight (rs == 1), columns j0 ..
// j0 + nc - 1 (nc <= 16), into the row-major scratch sp (row r at sp + r K): one 16 x 16 tile.
ELSA_512 inline void tile_to_rows(const void* w, int es, int64_t i0, int64_t cs, int nr, int nc, void* sp, int64_t K,
                                  int64_t s0) {
    __mmask16 rm = nr >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nr) - 1);
    __mmask16 cm = nc >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nc) - 1);
    __m512i r[16];
    for (int j = 0; j < 16; j++)
        r[j] = j >= nc ? _mm512_setzero_si512()
               : es == 4 ? _mm512_maskz_loadu_epi32(rm, (const uint32_t*)w + i0 + j * cs)
                         : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(rm, (const uint16_t*)w + i0 + j * cs));
    transpose16(r);
    for (int q = 0; q < nr; q++) {
        if (es == 4) _mm512_mask_storeu_epi32((uint32_t*)sp + s0 + q * K, cm, r[q]);
        else _mm512_mask_cvtepi32_storeu_epi16((uint16_t*)sp + s0 + q * K, cm, r[q]);
    }
}

#define ELSA_SCRATCH_BYTES (256 << 10)  // a sub-block's transposed rows: within L2 beside what is read
// Pack a column-stored block (rs == 1): sub-blocks of rows that fit ELSA_SCRATCH_BYTES, each
// transposed by 16 x 16 register tiles into a per-thread scratch (reused, never zeroed), then each
// row by the compress-store row packer.
ELSA_512 void pack_block_512(const void* w, int es, int64_t n0, int nb, int64_t K, int64_t cs, uint32_t low,
                             uint32_t t, const int64_t* rowptr, void* col, int isz, void* val, uint8_t* mask,
                             int64_t KB) {
    int64_t fit = ELSA_SCRATCH_BYTES / (K * es) / 16 * 16;
    int sub = (int)(fit < 16 ? 16 : fit > nb ? nb : fit);
    static thread_local std::vector<uint32_t> scratch;
    size_t need = (size_t)sub * K * es / 4 + 16;
    if (scratch.size() < need) scratch.resize(need);
    void* sp = scratch.data();
    for (int s0 = 0; s0 < nb; s0 += sub) {
        int ns = nb - s0 < sub ? nb - s0 : sub;
        for (int64_t j0 = 0; j0 < K; j0 += 16)
            for (int r0 = 0; r0 < ns; r0 += 16)
                tile_to_rows(w, es, n0 + s0 + r0 + j0 * cs, cs, ns - r0 < 16 ? ns - r0 : 16,
                             K - j0 < 16 ? (int)(K - j0) : 16, sp, K, r0 * K + j0);
        for (int r = 0; r < ns; r++) {
            int64_t n = n0 + s0 + r;
            int64_t e = pack_row_512(sp, es, r * K, K, low, t, rowptr[n], col, isz, val, mask ? mask + n * KB : nullptr, KB);
            if (col) pad_csr(col, isz, val, es, e);
        }
    }
}
#endif

template <typename EMIT>
inline void block_kept(const void* w, int es, int64_t n0, int nb, int64_t K, int64_t rs, int64_t cs, uint32_t low,
                       uint32_t t, EMIT emit) {
#if ELSA_AVX2
    if (isa >= 2 && rs == 1) { block_kept_512(w, es, n0, nb, K, cs, low, t, emit); return; }
#endif
    for (int64_t j = 0; j < K; j++)
        for (int r = 0; r < nb; r++) {
            int64_t i = (n0 + r) * rs + j * cs;
            if (kept(w, es, i, low, t)) emit(r, j, i);
        }
}

// Run f(n0, nb) over blocks of ELSA_TBLOCK rows (OpenMP).
template <typename F>
inline void over_blocks(int64_t N, int nt, int64_t work, F f) {
    const int64_t B = ELSA_TBLOCK, nblk = (N + B - 1) / B;
#pragma omp parallel for schedule(static) num_threads(nthreads_for(nt, work))
    for (int64_t b = 0; b < nblk; b++) f(b * B, (int)(N - b * B < B ? N - b * B : B));
}

}  // namespace

extern "C" {

int elsa_cpu_abi() { return 7; }
int elsa_cpu_avx2() { return ELSA_AVX2; }
// The instruction set the kernels use (2 AVX-512, 1 AVX2, 0 scalar); elsa_cpu_set_isa lowers it
// (tests and benchmarks of the AVX2 path on an AVX-512 machine) and returns the one now in use.
int elsa_cpu_isa() { return isa; }
int elsa_cpu_set_isa(int want) {
    int top = detect_isa();
    isa = want < top ? (want < 0 ? 0 : want) : top;
    return isa;
}

// -- packers ------------------------------------------------------------------------------------
// w: encoded bits, element (n, j) at w[n rs + j cs] (es = 4 or 2 bytes per element); k code bits;
// level t. Rows stored contiguously (cs == 1) on an AVX-512 CPU compare 16 codes per step and
// compress-store the kept values and their columns (one vectorised read per pass); other strides
// (a transposed Conv1D weight) go one weight at a time, 16 rows per thread chunk so that
// neighbouring rows share the cache lines they read.
#define ELSA_AT(n, j) ((n) * rs + (j) * cs)

void elsa_count_rows(const void* w, int es, int64_t N, int64_t K, int64_t rs, int64_t cs, int k, int t, int64_t* count,
                     int nt) {
    uint32_t low = (1u << k) - 1;
    bool fast = fast_rows(cs);
    if (cs != 1) {
        over_blocks(N, nt, N * K, [&](int64_t n0, int nb) {
#if ELSA_AVX2
            if (isa >= 2 && rs == 1) { count_block_512(w, es, n0, nb, K, cs, low, (uint32_t)t, count); return; }
#endif
            for (int r = 0; r < nb; r++) count[n0 + r] = 0;
            block_kept(w, es, n0, nb, K, rs, cs, low, (uint32_t)t, [&](int r, int64_t, int64_t) { count[n0 + r]++; });
        });
        return;
    }
#pragma omp parallel for schedule(static, 16) num_threads(nthreads_for(nt, N * K))
    for (int64_t n = 0; n < N; n++) {
#if ELSA_AVX2
        if (fast) { count[n] = count_row_512(w, es, n * rs, K, low, (uint32_t)t); continue; }
#endif
        int64_t c = 0;
        for (int64_t j = 0; j < K; j++) c += kept(w, es, ELSA_AT(n, j), low, (uint32_t)t);
        count[n] = c;
    }
    (void)fast;
}

// csr: rowptr from the counts rounded up to 8; each row's padding is zeroed here (the caller zeroes
// the entries past the last row).
void elsa_pack_csr(const void* w, int es, int64_t N, int64_t K, int64_t rs, int64_t cs, int k, int t,
                   const int64_t* rowptr, void* col, int isz, void* val, int nt) {
    uint32_t low = (1u << k) - 1;
    bool fast = fast_rows(cs);
    if (cs != 1) {
        over_blocks(N, nt, N * K, [&](int64_t n0, int nb) {
#if ELSA_AVX2
            if (isa >= 2 && rs == 1) { pack_block_512(w, es, n0, nb, K, cs, low, (uint32_t)t, rowptr, col, isz, val, nullptr, 0); return; }
#endif
            int64_t cur[ELSA_TBLOCK];
            for (int r = 0; r < nb; r++) cur[r] = rowptr[n0 + r];
            block_kept(w, es, n0, nb, K, rs, cs, low, (uint32_t)t, [&](int r, int64_t j, int64_t i) {
                if (isz == 2) ((uint16_t*)col)[cur[r]] = (uint16_t)j; else ((int32_t*)col)[cur[r]] = (int32_t)j;
                copy_val(val, cur[r]++, w, es, i);
            });
            for (int r = 0; r < nb; r++) pad_csr(col, isz, val, es, cur[r]);
        });
        return;
    }
#pragma omp parallel for schedule(static, 16) num_threads(nthreads_for(nt, N * K))
    for (int64_t n = 0; n < N; n++) {
        int64_t i = rowptr[n];
#if ELSA_AVX2
        if (fast) { pad_csr(col, isz, val, es, pack_row_512(w, es, n * rs, K, low, (uint32_t)t, i, col, isz, val, nullptr, 0)); continue; }
#endif
        for (int64_t j = 0; j < K; j++) {
            if (!kept(w, es, ELSA_AT(n, j), low, (uint32_t)t)) continue;
            if (isz == 2) ((uint16_t*)col)[i] = (uint16_t)j; else ((int32_t*)col)[i] = (int32_t)j;
            copy_val(val, i++, w, es, ELSA_AT(n, j));
        }
        pad_csr(col, isz, val, es, i);
    }
    (void)fast;
}

void elsa_pack_bitmask(const void* w, int es, int64_t N, int64_t K, int64_t rs, int64_t cs, int k, int t,
                       const int64_t* rowptr, uint8_t* mask, int64_t KB, void* val, int nt) {
    uint32_t low = (1u << k) - 1;
    bool fast = fast_rows(cs);
    if (cs != 1) {
        over_blocks(N, nt, N * K, [&](int64_t n0, int nb) {
            for (int r = 0; r < nb; r++) std::memset(mask + (n0 + r) * KB, 0, KB);
#if ELSA_AVX2
            if (isa >= 2 && rs == 1) { pack_block_512(w, es, n0, nb, K, cs, low, (uint32_t)t, rowptr, nullptr, 0, val, mask, KB); return; }
#endif
            int64_t cur[ELSA_TBLOCK];
            for (int r = 0; r < nb; r++) cur[r] = rowptr[n0 + r];
            block_kept(w, es, n0, nb, K, rs, cs, low, (uint32_t)t, [&](int r, int64_t j, int64_t i) {
                mask[(n0 + r) * KB + (j >> 3)] |= (uint8_t)(1u << (j & 7));
                copy_val(val, cur[r]++, w, es, i);
            });
        });
        return;
    }
#pragma omp parallel for schedule(static, 16) num_threads(nthreads_for(nt, N * K))
    for (int64_t n = 0; n < N; n++) {
        int64_t i = rowptr[n];
        uint8_t* mb = mask + n * KB;
        std::memset(mb, 0, KB);
#if ELSA_AVX2
        if (fast) { pack_row_512(w, es, n * rs, K, low, (uint32_t)t, i, nullptr, 0, val, mb, KB); continue; }
#endif
        for (int64_t j = 0; j < K; j++) {
            if (!kept(w, es, ELSA_AT(n, j), low, (uint32_t)t)) continue;
            mb[j >> 3] |= (uint8_t)(1u << (j & 7));
            copy_val(val, i++, w, es, ELSA_AT(n, j));
        }
    }
    (void)fast;
}

// bsr step 1: keep[br, bc] = 1 when block (br, bc) holds a kept weight; bcount[br] = kept blocks.
void elsa_bsr_blocks(const void* w, int es, int64_t N, int64_t K, int64_t rs, int64_t cs, int k, int t, int64_t R,
                     int64_t C, uint8_t* keep, int64_t* bcount, int nt) {
    uint32_t low = (1u << k) - 1;
    int64_t NBR = (N + R - 1) / R, NBC = (K + C - 1) / C;
#pragma omp parallel for schedule(static) num_threads(nthreads_for(nt, N * K))
    for (int64_t br = 0; br < NBR; br++) {
        uint8_t* kr = keep + br * NBC;
        std::memset(kr, 0, NBC);
        for (int64_t n = br * R; n < N && n < (br + 1) * R; n++)
            for (int64_t j = 0; j < K; j++)
                if (!kr[j / C] && kept(w, es, ELSA_AT(n, j), low, (uint32_t)t)) kr[j / C] = 1;
        int64_t c = 0;
        for (int64_t bc = 0; bc < NBC; bc++) c += kr[bc];
        bcount[br] = c;
    }
}

// bsr step 2: bcol and bval (zero-filled by the caller) of the kept blocks.
void elsa_pack_bsr(const void* w, int es, int64_t N, int64_t K, int64_t rs, int64_t cs, int k, int t, int64_t R,
                   int64_t C, int64_t R8, const uint8_t* keep, const int64_t* browptr, int32_t* bcol, void* bval, int nt) {
    uint32_t low = (1u << k) - 1;
    int64_t NBR = (N + R - 1) / R, NBC = (K + C - 1) / C;
#pragma omp parallel for schedule(static) num_threads(nthreads_for(nt, N * K))
    for (int64_t br = 0; br < NBR; br++) {
        int64_t b = browptr[br];
        for (int64_t bc = 0; bc < NBC; bc++) {
            if (!keep[br * NBC + bc]) continue;
            bcol[b] = (int32_t)bc;
            for (int64_t c = 0; c < C && bc * C + c < K; c++)
                for (int64_t r = 0; r < R && br * R + r < N; r++) {
                    int64_t i = ELSA_AT(br * R + r, bc * C + c);
                    if (kept(w, es, i, low, (uint32_t)t)) copy_val(bval, (b * C + c) * R8 + r, w, es, i);
                }
            b++;
        }
    }
}

// nm: idx and val (zero-filled by the caller) of an N:M level; returns the number of groups that
// keep more than n weights (0: packed; otherwise the level is not n:m and the arrays are partial).
int64_t elsa_pack_nm(const void* w, int es, int64_t N, int64_t K, int64_t rs, int64_t cs, int k, int t, int n, int m,
                     int64_t E, uint8_t* idx, void* val, int nt) {
    uint32_t low = (1u << k) - 1;
    int64_t bad = 0;
#pragma omp parallel for schedule(static, 16) num_threads(nthreads_for(nt, N * K)) reduction(+ : bad)
    for (int64_t r = 0; r < N; r++) {
        int64_t e = r * E;
        for (int64_t g = 0; g * m < K; g++) {
            int q = 0;
            for (int64_t j = g * m; j < K && j < (g + 1) * m; j++) {
                if (!kept(w, es, ELSA_AT(r, j), low, (uint32_t)t)) continue;
                if (q == n) { bad++; break; }
                idx[e + q] = (uint8_t)(j - g * m);
                copy_val(val, e + q, w, es, ELSA_AT(r, j));
                q++;
            }
            e += n;
        }
    }
    return bad;
}
#undef ELSA_AT

// -- csr from a bitmask level (no second read of the encoded weight) ----------------------------
#if ELSA_AVX2
// One row's columns from its mask (16 per step: compress of the column numbers), from entry i on.
ELSA_512 int64_t mask_cols_512(const uint8_t* mb, int64_t KB, void* col, int isz, int64_t i) {
    __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t b = 0; b < KB; b += 2) {
        __mmask16 m = (__mmask16)(mb[b] | (b + 1 < KB ? mb[b + 1] << 8 : 0));
        int c = __builtin_popcount(m);
        __mmask16 first = (__mmask16)((1u << c) - 1);
        __m512i kc = _mm512_maskz_compress_epi32(m, _mm512_add_epi32(iota, _mm512_set1_epi32((int)(8 * b))));
        if (isz == 4) _mm512_mask_storeu_epi32((int32_t*)col + i, first, kc);
        else _mm256_mask_storeu_epi16((uint16_t*)col + i, first, _mm512_cvtepi32_epi16(kc));
        i += c;
    }
    return i;
}
#endif

// brp / mask / bval: a bitmask level (N rows, KB mask bytes per row, es-byte values); rowptr: the csr
// row starts (the bitmask rows' counts rounded up to 8, by the caller). Writes col (isz bytes) and
// val, each row's padding zeroed (the caller zeroes the entries past the last row).
void elsa_bitmask_to_csr(int64_t N, int64_t KB, const int64_t* brp, const uint8_t* mask, const void* bval, int es,
                         const int64_t* rowptr, void* col, int isz, void* val, int nt) {
#pragma omp parallel for schedule(static, 16) num_threads(nthreads_for(nt, N * KB * 8))
    for (int64_t n = 0; n < N; n++) {
        int64_t c = brp[n + 1] - brp[n], i = rowptr[n];
        std::memcpy((char*)val + i * es, (const char*)bval + brp[n] * es, (size_t)(c * es));
        const uint8_t* mb = mask + n * KB;
#if ELSA_AVX2
        if (isa >= 2) { pad_csr(col, isz, val, es, mask_cols_512(mb, KB, col, isz, i)); continue; }
#endif
        for (int64_t b = 0; b < KB; b++)
            for (unsigned m = mb[b]; m; m &= m - 1) {
                int64_t j = 8 * b + __builtin_ctz(m);
                if (isz == 2) ((uint16_t*)col)[i] = (uint16_t)j; else ((int32_t*)col)[i] = (int32_t)j;
                i++;
            }
        pad_csr(col, isz, val, es, i);
    }
}

// -- unpack: the packed level back to a dense weight `[N, K]` (out zero-filled by the caller) ---------
// es = value size in bytes; the exact bits of every kept weight, +0.0 elsewhere.
void elsa_unpack_csr(int64_t N, int64_t K, const int64_t* rowptr, const int64_t* rowend, int nseg, int64_t ld,
                     const void* col, int isz, const void* val, int es, void* out, int nt) {
#pragma omp parallel for schedule(static) num_threads(nthreads_for(nt, csr_entries(N, rowptr, rowend, nseg, ld) * 4))
    for (int64_t n = 0; n < N; n++)
        for (int g = 0; g < nseg; g++)
        for (int64_t i = rowptr[g * ld + n]; i < rowend[g * ld + n]; i++) {
            int64_t c = isz == 2 ? ((const uint16_t*)col)[i] : ((const int32_t*)col)[i];
            uint32_t u = es == 4 ? ((const uint32_t*)val)[i] : ((const uint16_t*)val)[i];
            if (u) copy_val(out, n * K + c, val, es, i);  // padding entries: +0.0 at column 0
        }
}

void elsa_unpack_bitmask(int64_t N, int64_t K, int64_t KB, const int64_t* rowptr, const uint8_t* mask,
                         const void* val, int es, void* out, int nt) {
#pragma omp parallel for schedule(static) num_threads(nthreads_for(nt, N * K))
    for (int64_t n = 0; n < N; n++) {
        int64_t i = rowptr[n];
        const uint8_t* mb = mask + n * KB;
        for (int64_t j = 0; j < KB; j++)
            for (unsigned b = mb[j]; b; b &= b - 1) copy_val(out, n * K + 8 * j + __builtin_ctz(b), val, es, i++);
    }
}

void elsa_unpack_bsr(int64_t N, int64_t K, int64_t R, int64_t R8, int64_t C, const int64_t* browptr,
                     const int32_t* bcol, const void* bval, int es, void* out, int nt) {
    int64_t NBR = (N + R - 1) / R;
#pragma omp parallel for schedule(static) num_threads(nthreads_for(nt, N * K))
    for (int64_t br = 0; br < NBR; br++)
        for (int64_t b = browptr[br]; b < browptr[br + 1]; b++)
            for (int64_t c = 0; c < C && bcol[b] * C + c < K; c++)
                for (int64_t r = 0; r < R && br * R + r < N; r++)
                    copy_val(out, (br * R + r) * K + bcol[b] * C + c, bval, es, (b * C + c) * R8 + r);
}

void elsa_unpack_nm(int64_t N, int64_t K, int64_t E, int n, int m, const uint8_t* idx, const void* val, int es,
                    void* out, int nt) {
#pragma omp parallel for schedule(static) num_threads(nthreads_for(nt, N * K))
    for (int64_t r = 0; r < N; r++)
        for (int64_t e = 0; e < E; e++) {
            uint32_t u = es == 4 ? ((const uint32_t*)val)[r * E + e] : ((const uint16_t*)val)[r * E + e];
            if (u) copy_val(out, r * K + (e / n) * m + idx[r * E + e], val, es, r * E + e);  // padding: +0.0
        }
}

// -- products, M = 1 -------------------------------------------------------------------------------
// bsr: x `[NBC C]` (zero padded past K); y `[N]`.
void elsa_bsr_mv(int64_t N, int64_t R, int64_t R8, int64_t C, const int64_t* browptr, const int32_t* bcol,
                 const void* bval, int dt, const float* x, const float* bias, float* y, int nt) {
    int64_t NBR = (N + R - 1) / R;
    over_rows(NBR, nt, browptr[NBR] * R8 * C, [&](int64_t b0, int64_t b1) {
        for (int64_t br = b0; br < b1; br++)
            for (int64_t r0 = 0; r0 < R8; r0 += 64) {
                int nv = (int)((R8 - r0) / 8 < 8 ? (R8 - r0) / 8 : 8);
                BsrRow a{br, r0, R, R8, C, N, browptr, bcol, bval, x, bias, y};
                if (dt == 0) bsr_mv_dispatch<0>(nv, a);
                else if (dt == 1) bsr_mv_dispatch<1>(nv, a);
                else bsr_mv_dispatch<2>(nv, a);
            }
    });
}

void elsa_csr_mv(int64_t N, const int64_t* rowptr, const int64_t* rowend, int nseg, int64_t ld, const void* col, int isz,
                 const void* val, int dt, const float* x, const float* bias, float* y, int nt) {
    over_rows(N, nt, csr_entries(N, rowptr, rowend, nseg, ld) * 4, [&](int64_t n0, int64_t n1) {
        if (isz == 2) {
            const uint16_t* c = (const uint16_t*)col;
            if (dt == 0) csr_mv_rows<0>(n0, n1, rowptr, rowend, nseg, ld, c, val, x, bias, y);
            else if (dt == 1) csr_mv_rows<1>(n0, n1, rowptr, rowend, nseg, ld, c, val, x, bias, y);
            else csr_mv_rows<2>(n0, n1, rowptr, rowend, nseg, ld, c, val, x, bias, y);
        } else {
            const int32_t* c = (const int32_t*)col;
            if (dt == 0) csr_mv_rows<0>(n0, n1, rowptr, rowend, nseg, ld, c, val, x, bias, y);
            else if (dt == 1) csr_mv_rows<1>(n0, n1, rowptr, rowend, nseg, ld, c, val, x, bias, y);
            else csr_mv_rows<2>(n0, n1, rowptr, rowend, nseg, ld, c, val, x, bias, y);
        }
    });
}

// bitmask: x `[8 KB]` (zero padded past K).
void elsa_bitmask_mv(int64_t N, int64_t KB, const int64_t* rowptr, const uint8_t* mask, const void* val, int dt,
                     const float* x, const float* bias, float* y, int nt) {
    over_rows(N, nt, N * KB * 8, [&](int64_t n0, int64_t n1) {
#if ELSA_AVX2
        if (isa >= 2) {
            if (dt == 0) bitmask_mv_rows_512<0>(n0, n1, KB, rowptr, mask, val, x, bias, y);
            else if (dt == 1) bitmask_mv_rows_512<1>(n0, n1, KB, rowptr, mask, val, x, bias, y);
            else bitmask_mv_rows_512<2>(n0, n1, KB, rowptr, mask, val, x, bias, y);
            return;
        }
#endif
        if (dt == 0) bitmask_mv_rows<0>(n0, n1, KB, rowptr, mask, val, x, bias, y);
        else if (dt == 1) bitmask_mv_rows<1>(n0, n1, KB, rowptr, mask, val, x, bias, y);
        else bitmask_mv_rows<2>(n0, n1, KB, rowptr, mask, val, x, bias, y);
    });
}

}  // extern "C"
