// The skinny-linear loops, written once against a vector type `Vec` (see skinny_linear.cpp, which
// includes this file twice: inside an AVX-512 target region and inside an AVX2+FMA one). Not a
// standalone header: it expects `Vec` with kLanes, zero(), load(const float*|uint16_t*|int8_t*),
// fma(a, b, acc) and sum(v), and the constants kRows and kBatch, in the including namespace.

// Prefetch once per 64-byte line of weights (16 float32, 32 bfloat16, 64 int8 values).
template <typename W>
constexpr int64_t prefetch_stride() { return 64 / sizeof(W); }

// One tile: ROWS output rows x BATCH rows of x (b0..), over the whole K. The output rows are
// n0, n0 + stride, n0 + 2 * stride, ...: one from each of ROWS far-apart parts of the thread's
// slab, so the loads form ROWS long sequential streams (see linear_rows).
template <typename W, int ROWS, int BATCH>
static inline __attribute__((always_inline)) void tile(const float* x, const W* w, int64_t K, int64_t N,
                                                       int64_t n0, int64_t stride, int64_t b0,
                                                       const float* scale, const float* bias, float* y) {
  constexpr int64_t kPrefetchStride = prefetch_stride<W>();
  typename Vec::type acc[ROWS][BATCH];
  const W* row[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    row[r] = w + (n0 + r * stride) * K;
    for (int b = 0; b < BATCH; ++b) acc[r][b] = Vec::zero();
  }
  for (int64_t k = 0; k < K; k += Vec::kLanes) {
    typename Vec::type wv[ROWS];
    for (int r = 0; r < ROWS; ++r) wv[r] = Vec::load(row[r] + k);
    // With several rows of x the multiply-adds take long enough that the hardware prefetcher
    // alone leaves the loads waiting: fetch each stream's next row one row ahead. With one row
    // of x it only costs (measured on Zen 3: 19-22 GB/s with it, 23-25 without).
    if (BATCH > 1 && k % kPrefetchStride == 0)
      for (int r = 0; r < ROWS; ++r) __builtin_prefetch(row[r] + K + k, 0, 3);
    for (int b = 0; b < BATCH; ++b) {
      const typename Vec::type xv = Vec::load(x + (b0 + b) * K + k);
      for (int r = 0; r < ROWS; ++r) acc[r][b] = Vec::fma(wv[r], xv, acc[r][b]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    const int64_t n = n0 + r * stride;
    const float s = scale ? scale[n] : 1.f;
    const float add = bias ? bias[n] : 0.f;
    for (int b = 0; b < BATCH; ++b) y[(b0 + b) * N + n] = Vec::sum(acc[r][b]) * s + add;
  }
}

template <typename W, int ROWS>
static inline __attribute__((always_inline)) void rows_for_all_batches(const float* x, const W* w, int64_t M,
                                                                       int64_t K, int64_t N, int64_t n0,
                                                                       int64_t stride, const float* scale,
                                                                       const float* bias, float* y) {
  int64_t b0 = 0;
  for (; b0 + kBatch <= M; b0 += kBatch) tile<W, ROWS, kBatch>(x, w, K, N, n0, stride, b0, scale, bias, y);
  static_assert(kBatch <= 4, "remainder cases below cover kBatch <= 4");
  switch (M - b0) {
    case 3: tile<W, ROWS, 3>(x, w, K, N, n0, stride, b0, scale, bias, y); break;
    case 2: tile<W, ROWS, 2>(x, w, K, N, n0, stride, b0, scale, bias, y); break;
    case 1: tile<W, ROWS, 1>(x, w, K, N, n0, stride, b0, scale, bias, y); break;
    default: break;
  }
}

// Output rows [row_begin, row_end) for every row of x: one thread's slab of W. The slab is cut
// into kRows equal parts read side by side, part r's i-th row in the tile's r-th place: kRows
// sequential streams megabytes apart, as the bandwidth probe reads memory. Four adjacent rows a
// tile (the first version) made four streams of one 3 KB row each, restarted every tile: 16-18
// GB/s where the probe read 22-23 on a Zen 3 machine; these streams read 23-25. Every output
// element still sums its products in the same order, whatever the batch, the tile or the part.
template <typename W>
static void linear_rows(const float* x, const W* w, int64_t M, int64_t K, int64_t N, int64_t row_begin,
                        int64_t row_end, const float* scale, const float* bias, float* y) {
  const int64_t part = (row_end - row_begin) / kRows;
  for (int64_t i = 0; i < part; ++i)
    rows_for_all_batches<W, kRows>(x, w, M, K, N, row_begin + i, part, scale, bias, y);
  for (int64_t n = row_begin + kRows * part; n < row_end; ++n)
    rows_for_all_batches<W, 1>(x, w, M, K, N, n, 0, scale, bias, y);
}
