// Shared by elsa_cpu.cpp, elsa_cpu_mm.cpp and elsa_cpu_nested.cpp: the thread count of a kernel call and the split of
// its rows over OpenMP threads.
#pragma once
#include <cstdint>
#include <omp.h>

namespace {

// One thread below 32K units of work (the fork costs more than it saves), else nt.
inline int nthreads_for(int nt, int64_t work) { return work < (1 << 15) ? 1 : nt; }

// Entries the csr kernels read (rows [rowptr[n], rowend[n])): rowptr[N] for a plain csr level
// (rowend = rowptr + 1: no pass over the rows), the sum of the row lengths for a nested level's.
// Entries of a csr level: row n is the entries [rowptr[s ld + n], rowend[s ld + n]) of each segment
// s < nseg (a plain level: one segment, rowend = rowptr + 1; a level t of the nested csr: t segments).
inline int64_t csr_entries(int64_t N, const int64_t* rowptr, const int64_t* rowend, int nseg, int64_t ld) {
    int64_t s = 0;
    for (int g = 0; g < nseg; g++) {
        const int64_t *rp = rowptr + g * ld, *re = rowend + g * ld;
        if (re == rp + 1) { s += rp[N] - rp[0]; continue; }
        for (int64_t n = 0; n < N; n++) s += re[n] - rp[n];
    }
    return s;
}

// Run f(n0, n1) over N rows split in nt contiguous ranges (OpenMP, static).
template <typename F>
void over_rows(int64_t N, int nt, int64_t work, F f) {
    int T = nthreads_for(nt, work);
    if (T <= 1) { f(0, N); return; }
    int64_t chunk = (N + T - 1) / T;
#pragma omp parallel for schedule(static, 1) num_threads(T)
    for (int p = 0; p < T; p++) {
        int64_t n0 = p * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        if (n0 < n1) f(n0, n1);
    }
}

}  // namespace
