// ELSA nested csr: every sparse level 1..T of one weight in ONE packed form (built together with
// elsa_cpu.cpp, whose header comment describes the csr format, by elsa_codec/native.py; the PyTorch
// reference is elsa_codec/kernels/cpu/nested.py, pack_nested_reference).
//
// ELSA (Halvachi et al., arXiv 2312.06872), section 2.2: level t keeps the weights whose code c (the
// k low bits) is < t, so the levels are nested. A nested csr row holds its kept weights ordered by
// code: segment 0 (code 0: level 1), segment 1 (code 1: what level 2 adds), ... segment T-1; columns
// ascending within a segment, each segment padded to a multiple of 8 entries (value 0, column 0).
// Code T (dense only) and codes above are not stored. The segments are stored segment-major: every
// row's segment 0 first (level 1 is one contiguous csr), then every row's segment 1, ...; row n's
// segment c is the entries [segptr[c (N+1) + n], segptr[c (N+1) + n + 1]). Level t of row n is
// its segments 0 .. t-1, which every csr kernel reads (nseg = t): a level switch changes only how
// many segments the kernels read, and each level streams contiguous arrays.
//
// w: encoded bits, element (n, j) at w[n rs + j cs] (es = 4 or 2 bytes). Rows stored contiguously
// (cs == 1) on an AVX-512 CPU compare 16 codes per step and compress-store each code's values and
// columns to that code's segment; other strides go one weight at a time (nested.py hands a
// column-stored weight over as row-contiguous copies of 256-row blocks).
#include <cstdint>
#include <cstring>
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define ELSA_NESTED_512 1
#define ELSA_N512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define ELSA_NESTED_512 0
#endif

#include "elsa_cpu_common.h"

extern "C" int elsa_cpu_isa();

namespace {

#define ELSA_NAT(n, j) ((n) * rs + (j) * cs)
constexpr int FIXED_T = 8;  // up to 8 levels: one compare per level per 16 codes, no branch per code

inline uint32_t bits_at(const void* w, int es, int64_t i) {
    return es == 4 ? ((const uint32_t*)w)[i] : ((const uint16_t*)w)[i];
}

// Entries [i, e) of a segment's padding: value 0, column 0.
inline void pad_to(void* col, int isz, void* val, int es, int64_t i, int64_t e) {
    if (e <= i) return;
    std::memset((char*)col + i * isz, 0, (size_t)((e - i) * isz));
    std::memset((char*)val + i * es, 0, (size_t)((e - i) * es));
}

// Row n, one weight at a time: cnt[c] (c < T) = weights with code c.
void count_row(const void* w, int es, int64_t n, int64_t K, int64_t rs, int64_t cs, uint32_t low, int T, int64_t* cnt) {
    int64_t h[257] = {0};  // codes clamped to T: branch-free, T = dense only
    for (int64_t j = 0; j < K; j++) {
        uint32_t c = bits_at(w, es, ELSA_NAT(n, j)) & low;
        h[c < (uint32_t)T ? c : (uint32_t)T]++;
    }
    for (int c = 0; c < T; c++) cnt[c] = h[c];
}

// Row n, one weight at a time: each kept weight to its code's segment at cur[code].
void pack_row(const void* w, int es, int64_t n, int64_t K, int64_t rs, int64_t cs, uint32_t low, int T, int64_t* cur,
              void* col, int isz, void* val) {
    for (int64_t j = 0; j < K; j++) {
        int64_t i = ELSA_NAT(n, j);
        uint32_t u = bits_at(w, es, i), c = u & low;
        if (c >= (uint32_t)T) continue;
        int64_t e = cur[c]++;
        if (isz == 2) ((uint16_t*)col)[e] = (uint16_t)j; else ((int32_t*)col)[e] = (int32_t)j;
        if (es == 4) ((uint32_t*)val)[e] = u; else ((uint16_t*)val)[e] = (uint16_t)u;
    }
}

#if ELSA_NESTED_512
// 16 weights from w[i] (fewer at the row's end: `left`): their bits as epi32 and the lanes loaded.
ELSA_N512 inline __m512i load16(const void* w, int es, int64_t i, int64_t left, __mmask16* tail) {
    *tail = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    return es == 4 ? _mm512_maskz_loadu_epi32(*tail, (const uint32_t*)w + i)
                   : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(*tail, (const uint16_t*)w + i));
}

ELSA_N512 void count_row_512(const void* w, int es, int64_t base, int64_t K, uint32_t low, int T, int64_t* cnt) {
    const __m512i vlow = _mm512_set1_epi32((int)low);
    int64_t acc[FIXED_T] = {0};
    for (int64_t j = 0; j < K; j += 16) {
        __mmask16 tail;
        __m512i codes = _mm512_and_si512(load16(w, es, base + j, K - j, &tail), vlow);
        for (int c = 0; c < T; c++)
            acc[c] += __builtin_popcount(_mm512_mask_cmpeq_epu32_mask(tail, codes, _mm512_set1_epi32(c)));
    }
    for (int c = 0; c < T; c++) cnt[c] = acc[c];
}

// The lanes m of (bits, cols) compressed to entry cur of val / col (a masked store after an
// in-register compress: a compress-store to memory is microcoded and slow on some CPUs).
ELSA_N512 inline int64_t put16(__mmask16 m, __m512i bits, __m512i cols, int64_t cur, void* col, int isz, void* val,
                               int es) {
    int q = __builtin_popcount(m);
    __mmask16 first = (__mmask16)((1u << q) - 1);
    __m512i kv = _mm512_maskz_compress_epi32(m, bits), kc = _mm512_maskz_compress_epi32(m, cols);
    if (es == 4) _mm512_mask_storeu_epi32((uint32_t*)val + cur, first, kv);
    else _mm256_mask_storeu_epi16((uint16_t*)val + cur, first, _mm512_cvtepi32_epi16(kv));
    if (isz == 4) _mm512_mask_storeu_epi32((int32_t*)col + cur, first, kc);
    else _mm256_mask_storeu_epi16((uint16_t*)col + cur, first, _mm512_cvtepi32_epi16(kc));
    return cur + q;
}

// One row (contiguous from w[base]): T <= FIXED_T compares one code per level on every 16 codes;
// more levels walk the distinct kept codes of each 16 (at most 16 compares).
ELSA_N512 void pack_row_512(const void* w, int es, int64_t base, int64_t K, uint32_t low, int T, int64_t* cur,
                            void* col, int isz, void* val) {
    const __m512i vlow = _mm512_set1_epi32((int)low), vt = _mm512_set1_epi32(T);
    __m512i cols = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    for (int64_t j = 0; j < K; j += 16, cols = _mm512_add_epi32(cols, step)) {
        __mmask16 tail;
        __m512i bits = load16(w, es, base + j, K - j, &tail), codes = _mm512_and_si512(bits, vlow);
        if (T <= FIXED_T) {
            for (int c = 0; c < T; c++)
                cur[c] = put16(_mm512_mask_cmpeq_epu32_mask(tail, codes, _mm512_set1_epi32(c)), bits, cols, cur[c], col,
                               isz, val, es);
            continue;
        }
        alignas(64) uint32_t cv[16];
        _mm512_store_si512((__m512i*)cv, codes);
        for (__mmask16 left = _mm512_mask_cmplt_epu32_mask(tail, codes, vt); left;) {
            uint32_t c = cv[__builtin_ctz(left)];
            __mmask16 m = _mm512_mask_cmpeq_epu32_mask(left, codes, _mm512_set1_epi32((int)c));
            cur[c] = put16(m, bits, cols, cur[c], col, isz, val, es);
            left = (__mmask16)(left & ~m);
        }
    }
}
#endif

inline bool fast(int64_t cs) { return ELSA_NESTED_512 && cs == 1 && elsa_cpu_isa() >= 2; }

}  // namespace

extern "C" {

// count `[N, T]` int64: count[n T + c] = weights of row n with code c (c < T; the dense-only code T
// and codes above it are not counted). One read of w.
void elsa_count_codes(const void* w, int es, int64_t N, int64_t K, int64_t rs, int64_t cs, int k, int T,
                      int64_t* count, int nt) {
    const uint32_t low = (1u << k) - 1;
    const bool f = fast(cs) && T <= FIXED_T;
#pragma omp parallel for schedule(static, 16) num_threads(nthreads_for(nt, N * K))
    for (int64_t n = 0; n < N; n++) {
#if ELSA_NESTED_512
        if (f) { count_row_512(w, es, n * rs, K, low, T, count + n * T); continue; }
#endif
        count_row(w, es, n, K, rs, cs, low, T, count + n * T);
    }
    (void)f;
}

// segstart / segend `[T, ld]` (segstart[c ld + n] .. segend[c ld + n]: where segment c of row n goes;
// multiples of 8, from the counts of elsa_count_codes rounded up to 8 per segment, by the caller).
// Writes col (isz = 2 or 4 bytes) and val (es bytes, the exact bits) of every segment, its padding
// zeroed (the caller zeroes the entries past the last row). One read of w.
void elsa_pack_csr_nested(const void* w, int es, int64_t N, int64_t K, int64_t rs, int64_t cs, int k, int T,
                          const int64_t* segstart, const int64_t* segend, int64_t ld, void* col, int isz, void* val,
                          int nt) {
    const uint32_t low = (1u << k) - 1;
    const bool f = fast(cs);
#pragma omp parallel for schedule(static, 16) num_threads(nthreads_for(nt, N * K))
    for (int64_t n = 0; n < N; n++) {
        int64_t cur[256];
        for (int c = 0; c < T; c++) cur[c] = segstart[c * ld + n];
#if ELSA_NESTED_512
        if (f) pack_row_512(w, es, n * rs, K, low, T, cur, col, isz, val);
        else
#endif
            pack_row(w, es, n, K, rs, cs, low, T, cur, col, isz, val);
        for (int c = 0; c < T; c++) pad_to(col, isz, val, es, cur[c], segend[c * ld + n]);
    }
    (void)f;
}

}  // extern "C"
#undef ELSA_NAT
