// What one core's inner loops reach: the gather-FMA loop of the csr / bitmask / nm products at
// M > 1 (elsa_cpu_mm.inc, dot_entries: per kept weight one broadcast value and NV vectors of the
// x panel row it names), the same loop with AVX512-BF16 dot products on pair-interleaved bfloat16
// panels (vdpbf16ps: two kept weights of a row per instruction when they are neighbours), and
// each instruction's throughput with operands in registers. x rows sit in L1 (128 rows).
// Build and run: see COMMAND.txt next to this file.
#include <immintrin.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

template <int NV, int PS>
__attribute__((noinline)) void fma_gather(int64_t n, const int32_t* cols, const float* val, const float* xp, __m512* out) {
    __m512 acc[PS][NV];
    for (int p = 0; p < PS; p++) for (int u = 0; u < NV; u++) acc[p][u] = _mm512_setzero_ps();
    for (int64_t i = 0; i + PS <= n; i += PS)
        for (int p = 0; p < PS; p++) {
            __m512 v = _mm512_set1_ps(val[i + p]);
            const float* xr = xp + (int64_t)cols[i + p] * NV * 16;
            for (int u = 0; u < NV; u++) acc[p][u] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr + 16 * u), acc[p][u]);
        }
    for (int u = 0; u < NV; u++) for (int p = 0; p < PS; p++) out[u] = _mm512_add_ps(out[u], acc[p][u]);
}

template <int NV, int PS>
__attribute__((noinline)) void bf16_gather(int64_t n, const int32_t* cols, const uint32_t* val, const uint16_t* xp, __m512* out) {
    __m512 acc[PS][NV];
    for (int p = 0; p < PS; p++) for (int u = 0; u < NV; u++) acc[p][u] = _mm512_setzero_ps();
    for (int64_t i = 0; i + PS <= n; i += PS)
        for (int p = 0; p < PS; p++) {
            __m512bh v = (__m512bh)_mm512_set1_epi32((int)val[i + p]);
            const uint16_t* xr = xp + (int64_t)cols[i + p] * NV * 32;
            for (int u = 0; u < NV; u++)
                acc[p][u] = _mm512_dpbf16_ps(acc[p][u], v, (__m512bh)_mm512_loadu_si512(xr + 32 * u));
        }
    for (int u = 0; u < NV; u++) for (int p = 0; p < PS; p++) out[u] = _mm512_add_ps(out[u], acc[p][u]);
}

__attribute__((noinline)) void fma_regs(int64_t n, __m512* out) {
    __m512 a[10], b = out[0], c = out[1];
    for (int j = 0; j < 10; j++) a[j] = out[2 + j % 2];
    for (int64_t i = 0; i < n; i++)
        for (int j = 0; j < 10; j++) a[j] = _mm512_fmadd_ps(b, c, a[j]);
    for (int j = 0; j < 10; j++) out[0] = _mm512_add_ps(out[0], a[j]);
}

__attribute__((noinline)) void bf16_regs(int64_t n, __m512* out) {
    __m512 a[10];
    __m512bh b = (__m512bh)_mm512_castps_si512(out[0]), c = (__m512bh)_mm512_castps_si512(out[1]);
    for (int j = 0; j < 10; j++) a[j] = out[2 + j % 2];
    for (int64_t i = 0; i < n; i++)
        for (int j = 0; j < 10; j++) a[j] = _mm512_dpbf16_ps(a[j], b, c);
    for (int j = 0; j < 10; j++) out[0] = _mm512_add_ps(out[0], a[j]);
}

int main() {
    const int rows = 128, run = 64;
    const int64_t total = 1 << 22;
    std::vector<int32_t> cols(total);
    std::vector<float> val(total, 1e-3f);
    std::vector<uint32_t> val2(total, 0x3a803a80u);
    for (auto& c : cols) c = rand() % rows;
    float* xf = (float*)aligned_alloc(64, rows * 64 * 4);
    uint16_t* xb = (uint16_t*)aligned_alloc(64, rows * 128 * 2);
    for (int i = 0; i < rows * 64; i++) xf[i] = (float)(i % 7);
    for (int i = 0; i < rows * 128; i++) xb[i] = 0x3f80;
    __m512 out[4] = {_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f), _mm512_setzero_ps(), _mm512_setzero_ps()};
    auto best = [&](auto fn) { double b = 1e9; for (int r = 0; r < 5; r++) { double t = now(); fn(); b = std::min(b, now() - t); } return b; };
    printf("loop,vectors_per_entry,instr_per_s_G,gflops_if_all_lanes_useful\n");
    double t;
    t = best([&] { for (int64_t i = 0; i < total; i += run) fma_gather<1, 8>(run, &cols[i], &val[i], xf, out); });
    printf("fp32 gather-FMA (W=16),1,%.2f,%.0f\n", total / t / 1e9, total * 16 * 2 / t / 1e9);
    t = best([&] { for (int64_t i = 0; i < total; i += run) fma_gather<4, 2>(run, &cols[i], &val[i], xf, out); });
    printf("fp32 gather-FMA (W=64),4,%.2f,%.0f\n", 4 * total / t / 1e9, total * 64 * 2 / t / 1e9);
    t = best([&] { for (int64_t i = 0; i < total; i += run) bf16_gather<1, 8>(run, &cols[i], &val2[i], xb, out); });
    printf("bf16 gather-vdpbf16ps (W=16; a weight pair per entry),1,%.2f,%.0f\n", total / t / 1e9, total * 32 * 2 / t / 1e9);
    t = best([&] { for (int64_t i = 0; i < total; i += run) bf16_gather<4, 2>(run, &cols[i], &val2[i], xb, out); });
    printf("bf16 gather-vdpbf16ps (W=64; a weight pair per entry),4,%.2f,%.0f\n", 4 * total / t / 1e9, total * 128 * 2 / t / 1e9);
    const int64_t n = 1 << 24;
    t = best([&] { fma_regs(n, out); });
    printf("fp32 FMA registers only (10 chains),0,%.2f,%.0f\n", 10.0 * n / t / 1e9, 10.0 * n * 32 / t / 1e9);
    t = best([&] { bf16_regs(n, out); });
    printf("bf16 vdpbf16ps registers only (10 chains),0,%.2f,%.0f\n", 10.0 * n / t / 1e9, 10.0 * n * 64 / t / 1e9);
    float o[16];
    _mm512_storeu_ps(o, out[0]);
    fprintf(stderr, "checksum %g\n", o[0]);
}
