// Float32 matrix products with few rows (a decode or verify step: batch x W rows), for XLA:CPU.
//
// XLA:CPU multiplies a 1-row activation by a weight matrix at about the memory bandwidth (a
// matrix-vector product), but 2..8 rows go to a general matrix product that takes about twice
// as long on this 2-core machine (docs/benchmarks.md, "Few-row products"). These kernels read
// every weight once, in long contiguous runs, and use each loaded weight vector for every row,
// so R rows cost about what the weight's bytes cost until R FMAs per load make them
// compute-bound (gptk_jax/kernels/few_rows.py routes M <= 8 rows here, more to XLA).
//
//   nn: y[M,N] = x[M,K] @ w[K,N]      (a Dense kernel, Flax's [in, out] layout)
//   nt: y[M,N] = x[M,K] @ w[N,K]^T    (a tied unembedding: the embedding table [vocab, dim])
//   w in float32, or in bfloat16 (the *Bf16 handlers; x and y float32, sums in float32)
//
// Each output element is summed in the same order whatever M and the split over threads are,
// so a row gets the same bits alone or among others (a verify step's first token and a greedy
// step agree exactly in these products). Work is split into chunks run on XLA's own intra-op
// thread pool (the FFI's ThreadPool), so no second pool competes with XLA's for the cores.
// Vectors are GCC vector extensions (16 floats: AVX-512 where the CPU has it, two AVX2 halves
// or four SSE quarters where not).

#include <atomic>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

static inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
static inline void store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }
static inline v16 splat(float a) { return v16{} + a; }

// Weights in float32, or in bfloat16 (the upper 16 bits of a float32: uint16_t here, as the
// FFI maps BF16): loaded 16 at a time and widened to float32 (a shift), so a bfloat16 weight
// costs half the bytes and the products still sum in float32 (a drafter's weights, whose
// products need not match the trunk's bits: decoding verifies every draft).
typedef uint16_t v16h __attribute__((vector_size(32), aligned(2)));
typedef uint32_t v16i __attribute__((vector_size(64)));

static inline v16 loadw(const float* p) { return load(p); }
static inline v16 loadw(const uint16_t* p) {
  v16i wide = __builtin_convertvector(*reinterpret_cast<const v16h*>(p), v16i) << 16;
  return (v16)wide;     // the same 64 bytes, read as floats
}
static inline float scalar(float a) { return a; }
static inline float scalar(uint16_t a) {
  uint32_t bits = uint32_t(a) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Work on XLA's own intra-op threads (no second pool fighting it for the 2 cores): `chunks`
// pieces of work claimed one at a time from a shared counter by the calling thread and by up to
// `helpers` tasks scheduled on the pool. The caller claims too, so the work ends even if no task
// ever starts; a task that starts late finds nothing left (the state is shared, not on the
// caller's stack).
struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename F>
static void parallel_chunks(ffi::ThreadPool& pool, int64_t chunks, F body) {
  auto shared = std::make_shared<Shared>();
  auto work = [shared, chunks, body]() {
    for (int64_t i; (i = shared->next.fetch_add(1)) < chunks;) {
      body(i);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  while (shared->done.load(std::memory_order_acquire) < chunks) __builtin_ia32_pause();
}

// Chunks to split a product over: 2 per thread, but none smaller than 64K weights (256 KB):
// handing a small product to another thread costs more than it saves.
static int64_t work_parts(ffi::ThreadPool& pool, int64_t weights) {
  const int64_t most = 2 * std::max<int64_t>(pool.num_threads(), 1);
  return std::max<int64_t>(1, std::min<int64_t>(most, weights / 65536));
}

// nn, columns [c0, c1) (a multiple of 16 wide) for all M rows (row r of x at x + r * ldx) over
// the K weight rows at w, k-outer: the tile of each weight row is read contiguously
// (prefetch-friendly), 8 weight rows at a time, and used for every activation row at once; the
// M x tile partial sums stay in L1.
template <typename WT>
static void nn_tile(const float* x, int64_t ldx, const WT* w, float* y, int64_t M,
                    int64_t K, int64_t N, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < M; ++r) std::memset(y + r * N + c0, 0, sizeof(float) * (c1 - c0));
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const WT* w0 = w + k * N;
    for (int64_t c = c0; c < c1; c += 16) {
      v16 a[8];
      for (int i = 0; i < 8; ++i) a[i] = loadw(w0 + i * N + c);
      for (int64_t r = 0; r < M; ++r) {
        const float* xr = x + r * ldx + k;
        float* out = y + r * N + c;
        v16 s0 = load(out) + xr[0] * a[0] + xr[1] * a[1] + xr[2] * a[2] + xr[3] * a[3];
        v16 s1 = xr[4] * a[4] + xr[5] * a[5] + xr[6] * a[6] + xr[7] * a[7];
        store(out, s0 + s1);
      }
    }
  }
  for (; k < K; ++k) {
    const WT* w0 = w + k * N;
    for (int64_t r = 0; r < M; ++r) {
      const float b = x[r * ldx + k];
      for (int64_t c = c0; c < c1; c += 16) {
        float* out = y + r * N + c;
        store(out, load(out) + b * loadw(w0 + c));
      }
    }
  }
}

// nn, the last columns (fewer than 16): plain loops.
template <typename WT>
static void nn_tail(const float* x, const WT* w, float* y, int64_t M, int64_t K, int64_t N,
                    int64_t n0) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t n = n0; n < N; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[r * K + k] * scalar(w[k * N + n]);
      y[r * N + n] = s;
    }
}

// A product no wider than this many columns (every one of them a multiple of 16) is split over
// K instead of over columns (`nn`).
static const int64_t kNarrow = 1024;

template <typename WT>
static void nn(ffi::ThreadPool& pool, const float* x, const WT* w, float* y, int64_t M,
               int64_t K, int64_t N) {
  const int64_t vec = N / 16 * 16;
  if (vec == N && N <= kNarrow && K >= 16) {
    // Narrow (wo, w2, the fused q|k|v): two halves of K, each one full-width tile that reads
    // its weight rows as one contiguous stream, summed as lower + upper. Split over columns
    // instead, each thread read short runs of every weight row and these products ran at
    // 60-80 % of the bandwidth at 4-8 rows (docs/benchmarks.md, "Narrow few-row products split
    // over K"). The halves are the same whatever M and the threads, so the order of every sum
    // is too.
    const int64_t kmid = K / 2 / 8 * 8;
    std::unique_ptr<float[]> upper(new float[M * N]);
    float* up = upper.get();
    auto half = [=](int64_t h) {
      if (h == 0) nn_tile(x, K, w, y, M, kmid, N, 0, N);
      else nn_tile(x + kmid, K, w + kmid * N, up, M, K - kmid, N, 0, N);
    };
    if (work_parts(pool, K * N) > 1) {
      parallel_chunks(pool, 2, half);
    } else {
      half(0);
      half(1);
    }
    for (int64_t i = 0; i < M * N; ++i) y[i] += up[i];
    return;
  }
  // tiles: at least 2 per thread, at most 1024 columns and M x tile partial sums <= 32 KB (L1)
  const int64_t parts = work_parts(pool, K * N);
  int64_t tile = (vec / parts + 15) / 16 * 16;
  int64_t most = 8192 / (M > 0 ? M : 1) / 16 * 16;
  most = most < 16 ? 16 : (most > 1024 ? 1024 : most);
  tile = tile < 16 ? 16 : (tile > most ? most : tile);
  const int64_t tiles = (vec + tile - 1) / tile;
  parallel_chunks(pool, tiles, [=](int64_t t) {
    const int64_t c0 = t * tile, c1 = c0 + tile < vec ? c0 + tile : vec;
    nn_tile(x, K, w, y, M, K, N, c0, c1);
  });
  if (vec < N) nn_tail(x, w, y, M, K, N, vec);
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline float hsum(v16 v) {
  v8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// nt, one weight row n for R rows, read once front to back: y[r, n] = sum_k x[r,k] w[n,k]
template <int R, typename WT>
static void nt_row(const float* x, const WT* w, float* y, int64_t K, int64_t N, int64_t n) {
  v16 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = v16{};
  const WT* wn = w + n * K;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    v16 a0 = loadw(wn + k), a1 = loadw(wn + k + 16);
    for (int r = 0; r < R; ++r) {
      acc[r][0] += load(x + r * K + k) * a0;
      acc[r][1] += load(x + r * K + k + 16) * a1;
    }
  }
  for (; k + 16 <= K; k += 16) {
    v16 a0 = loadw(wn + k);
    for (int r = 0; r < R; ++r) acc[r][0] += load(x + r * K + k) * a0;
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(acc[r][0] + acc[r][1]);
    for (int64_t j = k; j < K; ++j) s += x[r * K + j] * scalar(wn[j]);
    y[r * N + n] = s;
  }
}

template <typename WT>
static void nt(ffi::ThreadPool& pool, const float* x, const WT* w, float* y, int64_t M,
               int64_t K, int64_t N) {
  const int64_t parts = 2 * work_parts(pool, K * N);
  const int64_t span = (N + parts - 1) / parts;
  parallel_chunks(pool, (N + span - 1) / span, [=](int64_t part) {
    const int64_t end = std::min<int64_t>(N, (part + 1) * span);
    for (int64_t n = part * span; n < end; ++n) {
      int64_t r = 0;
      for (; r + 4 <= M; r += 4) nt_row<4, WT>(x + r * K, w, y + r * N, K, N, n);
      switch (M - r) {
        case 3: nt_row<3, WT>(x + r * K, w, y + r * N, K, N, n); break;
        case 2: nt_row<2, WT>(x + r * K, w, y + r * N, K, N, n); break;
        case 1: nt_row<1, WT>(x + r * K, w, y + r * N, K, N, n); break;
        default: break;
      }
    }
  });
}

template <ffi::DataType T>
static ffi::Error Check(ffi::Buffer<ffi::F32>& x, ffi::Buffer<T>& w, int64_t* M, int64_t* K,
                        int64_t* N, bool transposed) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("small_matmul: x and w must be 2-D");
  *M = xd[0];
  *K = xd[1];
  *N = transposed ? wd[0] : wd[1];
  if ((transposed ? wd[1] : wd[0]) != *K)
    return ffi::Error::InvalidArgument("small_matmul: x and w disagree on the contracted size");
  return ffi::Error::Success();
}

// y = x @ w (transposed: x @ w^T), w float32 or bfloat16 (T), x and y float32.
template <ffi::DataType T, bool transposed>
static ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  int64_t M, K, N;
  ffi::Error e = Check(x, w, &M, &K, &N, transposed);
  if (e.failure()) return e;
  if (transposed) nt(pool, x.typed_data(), w.typed_data(), y->typed_data(), M, K, N);
  else nn(pool, x.typed_data(), w.typed_data(), y->typed_data(), M, K, N);
  return ffi::Error::Success();
}

#define GPTK_HANDLER(name, T, transposed)                                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (Impl<T, transposed>),                      \
                                ffi::Ffi::Bind()                                  \
                                    .Ctx<ffi::ThreadPool>()                       \
                                    .Arg<ffi::Buffer<ffi::F32>>()                 \
                                    .Arg<ffi::Buffer<T>>()                        \
                                    .Ret<ffi::Buffer<ffi::F32>>());

GPTK_HANDLER(GptkSmallMatmulNN, ffi::F32, false)
GPTK_HANDLER(GptkSmallMatmulNT, ffi::F32, true)
GPTK_HANDLER(GptkSmallMatmulNNBf16, ffi::BF16, false)
GPTK_HANDLER(GptkSmallMatmulNTBf16, ffi::BF16, true)
