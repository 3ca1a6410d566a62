// Winograd F(4x4, 3x3) convolutions (Lavin & Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2016), float32, NHWC activations and HWIO kernels, for 3x3 stride-1 undilated
// ungrouped convolutions with paddings 0-2: all three passes, included by onednn_conv.cc.
//
// Why: oneDNN 3.2's direct 3x3 convolutions already run near the cores' FMA peak (its own
// Winograd kernels are AVX-512 only and not used here); F(4x4, 3x3) needs 2.25 multiplications
// per output where direct needs 9, and made ResNet train steps 1.3-1.7x faster than the direct
// kernels on AVX2 and on AVX-512 CPUs (benchmarks/README.md). Each 4x4 output tile is computed from a
// 6x6 input tile in three steps: transform the input tiles (V = B^T d B) and the kernel
// (U = G g G^T) into 36 "Winograd points", multiply per point (36 matrix products over
// channels: M[p] = V[p] U[p], by oneDNN's sgemm), and transform back (Y = A^T M A). The
// gradients are the same steps transposed: backward-data is the forward convolution of dy with
// the flipped, transposed kernel; backward-weights is dU[p] = V[p]^T (A dy A^T)[p] summed over
// tiles, then dg = G^T dU G. Sums are in a fixed order for a given thread count, so results are
// deterministic; they differ from direct convolution by float32 rounding (relative ~1e-6).
//
// Layouts: V and M are [36][tiles][channels] (tiles = n * ceil(oh/4) * ceil(ow/4), row-major),
// U and dU [36][in][out]. The transforms run over channels innermost (contiguous in NHWC), so
// the compiler vectorizes them; they are compiled for AVX2+FMA and for plain x86-64, and the
// loader's CPU picks one (target_clones).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.h"

namespace winograd {

constexpr int kTile = 4;     // output tile side (m)
constexpr int kAlpha = 6;    // input tile side (m + r - 1)
constexpr int kPoints = 36;  // kAlpha * kAlpha
constexpr const char* kImpl = "winograd_f4x4_3x3+dnnl_sgemm";  // what the library reports

// Whether F(4x4, 3x3) computes this convolution (every pass): a 3x3 kernel, stride 1, no
// dilation, no groups, paddings 0-2 (backward-data pads dy by 2 - padding), and channels in
// eights (the transforms' vectors), enough of them that the per-point products are matrix
// products worth the transforms.
inline bool fits(int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
                 int64_t groups, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t ic,
                 int64_t oc) {
  auto pad_ok = [](int64_t p) { return p >= 0 && p <= 2; };
  return kh == 3 && kw == 3 && sh == 1 && sw == 1 && dh == 1 && dw == 1 && groups == 1 &&
         pad_ok(pt) && pad_ok(pb) && pad_ok(pl) && pad_ok(pr) && ic >= 16 && oc >= 16 &&
         ic % 8 == 0 && oc % 8 == 0;
}

// Whether backward-weights fits too: every thread sums its own dU ([36][ic][oc] floats), so
// wide layers on many cores would need gigabytes; past 256 MiB in all oneDNN's direct kernel
// computes it.
inline bool kernel_gradient_fits(int64_t ic, int64_t oc) {
  return static_cast<int64_t>(omp_get_max_threads()) * kPoints * ic * oc * 4 <= (256LL << 20);
}

struct Tiles {
  int64_t n, th, tw;  // batch, tile rows, tile columns
  int64_t count() const { return n * th * tw; }
  static Tiles cover(int64_t n, int64_t oh, int64_t ow) {
    return {n, (oh + kTile - 1) / kTile, (ow + kTile - 1) / kTile};
  }
};

#define WINOGRAD_VECTORIZED __attribute__((target_clones("avx2,fma", "default")))

// Eight channels at a time: GCC/Clang vector types (AVX registers in the avx2 clone, pairs of
// SSE registers in the default one). Unaligned: a channel row starts anywhere.
typedef float Vec __attribute__((vector_size(32), aligned(4)));
constexpr int64_t kLanes = 8;
__attribute__((always_inline)) inline Vec load(const float* p) { Vec v; std::memcpy(&v, p, sizeof v); return v; }
__attribute__((always_inline)) inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// V[p][t - first][c] = (B^T d B)[p] for the 6x6 input tile d of each tile t of [first, last):
// rows ty*4 - top .. +5 and columns tx*4 - left .. +5 of x (N, h, w, c); pixels outside x are zero
// (the padding: `zeros` holds c zeros).
WINOGRAD_VECTORIZED
static void transform_input(const float* x, int64_t h, int64_t w, int64_t c, int64_t top,
                            int64_t left, Tiles tiles, int64_t first, int64_t last,
                            const float* zeros, float* v) {
  const int64_t point_stride = (last - first) * c;
  for (int64_t t = first; t < last; ++t) {
    const int64_t n = t / (tiles.th * tiles.tw), ty = t / tiles.tw % tiles.th, tx = t % tiles.tw;
    const float* d[kAlpha][kAlpha];
    for (int i = 0; i < kAlpha; ++i) {
      const int64_t row = ty * kTile - top + i;
      for (int j = 0; j < kAlpha; ++j) {
        const int64_t col = tx * kTile - left + j;
        d[i][j] = (row >= 0 && row < h && col >= 0 && col < w)
                      ? x + ((n * h + row) * w + col) * c : zeros;
      }
    }
    float* out = v + (t - first) * c;
    for (int64_t k = 0; k < c; k += kLanes) {
      Vec s[kAlpha][kAlpha];  // B^T d (columns first), then (B^T d) B
      for (int j = 0; j < kAlpha; ++j) {
        const Vec d0 = load(d[0][j] + k), d1 = load(d[1][j] + k), d2 = load(d[2][j] + k),
                  d3 = load(d[3][j] + k), d4 = load(d[4][j] + k), d5 = load(d[5][j] + k);
        s[0][j] = 4 * d0 - 5 * d2 + d4;
        s[1][j] = -4 * (d1 + d2) + d3 + d4;
        s[2][j] = 4 * (d1 - d2) - d3 + d4;
        s[3][j] = 2 * (d3 - d1) - d2 + d4;
        s[4][j] = 2 * (d1 - d3) - d2 + d4;
        s[5][j] = 4 * d1 - 5 * d3 + d5;
      }
      for (int i = 0; i < kAlpha; ++i) {
        const Vec* r = s[i];
        float* o = out + i * kAlpha * point_stride + k;
        store(o + 0 * point_stride, 4 * r[0] - 5 * r[2] + r[4]);
        store(o + 1 * point_stride, -4 * (r[1] + r[2]) + r[3] + r[4]);
        store(o + 2 * point_stride, 4 * (r[1] - r[2]) - r[3] + r[4]);
        store(o + 3 * point_stride, 2 * (r[3] - r[1]) - r[2] + r[4]);
        store(o + 4 * point_stride, 2 * (r[1] - r[3]) - r[2] + r[4]);
        store(o + 5 * point_stride, 4 * r[1] - 5 * r[3] + r[5]);
      }
    }
  }
}

// y (N, oh, ow, c) from M[p][t - first][c] for the tiles t of [first, last): each tile's 4x4 block
// of A^T M A, cut at the edges (the rest goes to `sink`, c floats).
WINOGRAD_VECTORIZED
static void transform_output(const float* m, int64_t oh, int64_t ow, int64_t c, Tiles tiles,
                             int64_t first, int64_t last, float* sink, float* y) {
  const int64_t point_stride = (last - first) * c;
  for (int64_t t = first; t < last; ++t) {
    const int64_t n = t / (tiles.th * tiles.tw), ty = t / tiles.tw % tiles.th, tx = t % tiles.tw;
    float* o[kTile][kTile];
    for (int i = 0; i < kTile; ++i)
      for (int j = 0; j < kTile; ++j) {
        const int64_t row = ty * kTile + i, col = tx * kTile + j;
        o[i][j] = (row < oh && col < ow) ? y + ((n * oh + row) * ow + col) * c : sink;
      }
    const float* in = m + (t - first) * c;
    for (int64_t k = 0; k < c; k += kLanes) {
      Vec s[kTile][kAlpha];  // A^T M (columns first), then (A^T M) A
      for (int j = 0; j < kAlpha; ++j) {
        const float* p = in + j * point_stride + k;
        const Vec m0 = load(p), m1 = load(p + 6 * point_stride), m2 = load(p + 12 * point_stride),
                  m3 = load(p + 18 * point_stride), m4 = load(p + 24 * point_stride),
                  m5 = load(p + 30 * point_stride);
        s[0][j] = m0 + m1 + m2 + m3 + m4;
        s[1][j] = m1 - m2 + 2 * (m3 - m4);
        s[2][j] = m1 + m2 + 4 * (m3 + m4);
        s[3][j] = m1 - m2 + 8 * (m3 - m4) + m5;
      }
      for (int i = 0; i < kTile; ++i) {
        const Vec* r = s[i];
        store(o[i][0] + k, r[0] + r[1] + r[2] + r[3] + r[4]);
        store(o[i][1] + k, r[1] - r[2] + 2 * (r[3] - r[4]));
        store(o[i][2] + k, r[1] + r[2] + 4 * (r[3] + r[4]));
        store(o[i][3] + k, r[1] - r[2] + 8 * (r[3] - r[4]) + r[5]);
      }
    }
  }
}

// M[p][t - first][c] = (A dy A^T)[p] for the 4x4 block of dy (N, oh, ow, c) of each tile t of
// [first, last) (zero past the edges): the transpose of transform_output.
WINOGRAD_VECTORIZED
static void transform_output_gradient(const float* dy, int64_t oh, int64_t ow, int64_t c,
                                      Tiles tiles, int64_t first, int64_t last,
                                      const float* zeros, float* m) {
  const int64_t point_stride = (last - first) * c;
  for (int64_t t = first; t < last; ++t) {
    const int64_t n = t / (tiles.th * tiles.tw), ty = t / tiles.tw % tiles.th, tx = t % tiles.tw;
    const float* g[kTile][kTile];
    for (int i = 0; i < kTile; ++i)
      for (int j = 0; j < kTile; ++j) {
        const int64_t row = ty * kTile + i, col = tx * kTile + j;
        g[i][j] = (row < oh && col < ow) ? dy + ((n * oh + row) * ow + col) * c : zeros;
      }
    float* out = m + (t - first) * c;
    for (int64_t k = 0; k < c; k += kLanes) {
      Vec s[kAlpha][kTile];  // A dy (columns first), then (A dy) A^T
      for (int j = 0; j < kTile; ++j) {
        const Vec y0 = load(g[0][j] + k), y1 = load(g[1][j] + k), y2 = load(g[2][j] + k),
                  y3 = load(g[3][j] + k);
        s[0][j] = y0;
        s[1][j] = y0 + y1 + y2 + y3;
        s[2][j] = y0 - y1 + y2 - y3;
        s[3][j] = y0 + 2 * y1 + 4 * y2 + 8 * y3;
        s[4][j] = y0 - 2 * y1 + 4 * y2 - 8 * y3;
        s[5][j] = y3;
      }
      for (int i = 0; i < kAlpha; ++i) {
        const Vec* r = s[i];
        float* o = out + i * kAlpha * point_stride + k;
        store(o + 0 * point_stride, r[0]);
        store(o + 1 * point_stride, r[0] + r[1] + r[2] + r[3]);
        store(o + 2 * point_stride, r[0] - r[1] + r[2] - r[3]);
        store(o + 3 * point_stride, r[0] + 2 * r[1] + 4 * r[2] + 8 * r[3]);
        store(o + 4 * point_stride, r[0] - 2 * r[1] + 4 * r[2] - 8 * r[3]);
        store(o + 5 * point_stride, r[3]);
      }
    }
  }
}

// U[p][i][o] = (G g G^T)[p] for the HWIO kernel w (3, 3, ic, oc). With `flip` (backward-data)
// the kernel of the transposed convolution: g'[a][b][o][i] = g[2-a][2-b][i][o], U [36][oc][ic].
static void transform_kernel(const float* w, int64_t ic, int64_t oc, bool flip, float* u) {
  const int64_t rows = flip ? oc : ic, cols = flip ? ic : oc, point_stride = ic * oc;
  auto at = [&](int a, int b, int64_t r, int64_t q) {  // g'[a][b][r][q]
    return flip ? w[(((2 - a) * 3 + (2 - b)) * ic + q) * oc + r] : w[((a * 3 + b) * ic + r) * oc + q];
  };
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < cols; ++q) {
      float s[kAlpha][3];  // G g (columns first), then (G g) G^T
      for (int b = 0; b < 3; ++b) {
        const float g0 = at(0, b, r, q), g1 = at(1, b, r, q), g2 = at(2, b, r, q);
        s[0][b] = g0 / 4;
        s[1][b] = -(g0 + g1 + g2) / 6;
        s[2][b] = -(g0 - g1 + g2) / 6;
        s[3][b] = g0 / 24 + g1 / 12 + g2 / 6;
        s[4][b] = g0 / 24 - g1 / 12 + g2 / 6;
        s[5][b] = g2;
      }
      float* o = u + r * cols + q;
      for (int i = 0; i < kAlpha; ++i) {
        const float g0 = s[i][0], g1 = s[i][1], g2 = s[i][2];
        float* oi = o + i * kAlpha * point_stride;
        oi[0 * point_stride] = g0 / 4;
        oi[1 * point_stride] = -(g0 + g1 + g2) / 6;
        oi[2 * point_stride] = -(g0 - g1 + g2) / 6;
        oi[3 * point_stride] = g0 / 24 + g1 / 12 + g2 / 6;
        oi[4 * point_stride] = g0 / 24 - g1 / 12 + g2 / 6;
        oi[5 * point_stride] = g2;
      }
    }
}

// The HWIO kernel gradient dw (3, 3, ic, oc) from dU[p][i][o]: G^T dU G, the transpose of
// transform_kernel.
static void transform_kernel_gradient(const float* du, int64_t ic, int64_t oc, float* dw) {
  const int64_t point_stride = ic * oc;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < ic; ++r)
    for (int64_t q = 0; q < oc; ++q) {
      const float* in = du + r * oc + q;
      float s[3][kAlpha];  // G^T dU (columns first), then (G^T dU) G
      for (int j = 0; j < kAlpha; ++j) {
        float u[kAlpha];
        for (int i = 0; i < kAlpha; ++i) u[i] = in[(i * kAlpha + j) * point_stride];
        s[0][j] = u[0] / 4 - (u[1] + u[2]) / 6 + (u[3] + u[4]) / 24;
        s[1][j] = (u[2] - u[1]) / 6 + (u[3] - u[4]) / 12;
        s[2][j] = (u[3] + u[4] - u[1] - u[2]) / 6 + u[5];
      }
      for (int a = 0; a < 3; ++a) {
        const float* u = s[a];
        float* o = dw + (a * 3) * ic * oc + r * oc + q;
        o[0] = u[0] / 4 - (u[1] + u[2]) / 6 + (u[3] + u[4]) / 24;
        o[ic * oc] = (u[2] - u[1]) / 6 + (u[3] - u[4]) / 12;
        o[2 * ic * oc] = (u[3] + u[4] - u[1] - u[2]) / 6 + u[5];
      }
    }
}

inline bool sgemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                  const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  return dnnl_sgemm(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc) == dnnl_success;
}

// Tiles per block: a block's transformed input and output ([36][64][channels] each) stay in the
// core's caches between the transforms and the products, and each product has 64 rows, enough
// to pay for sgemm packing U[p] (blocks of 8-256 tiles were measured: below 64 the 256-channel
// products are slower than direct convolution).
constexpr int64_t kBlockTiles = 64;

// A thread's buffer, kept between calls (a fresh one would be faulted in page by page each time).
inline float* thread_buffer(int slot, int64_t floats) {
  static thread_local std::vector<float> buffers[4];
  if (static_cast<int64_t>(buffers[slot].size()) < floats) buffers[slot].resize(floats);
  return buffers[slot].data();
}

// y (N, oh, ow, oc) = x (N, h, w, ic) (*) kernel, with the given top/left padding (the output size
// sets the rest). `flip`: the kernel is the forward convolution's (3, 3, oc, ic) and this is its
// backward-data. Blocks of tiles are spread over the OpenMP threads; each block is transformed,
// multiplied (36 single-threaded sgemms) and transformed back in the thread's cache.
inline bool convolve(const float* x, int64_t n, int64_t h, int64_t w, int64_t ic,
                     const float* kernel, bool flip, int64_t top, int64_t left, int64_t oh,
                     int64_t ow, int64_t oc, float* y) {
  const Tiles tiles = Tiles::cover(n, oh, ow);
  const int64_t count = tiles.count(), block = kBlockTiles;
  const int64_t blocks = (count + block - 1) / block;
  static std::vector<float> u;
  u.resize(kPoints * ic * oc);
  if (flip) transform_kernel(kernel, oc, ic, true, u.data());
  else transform_kernel(kernel, ic, oc, false, u.data());
  std::atomic<bool> ok{true};
#pragma omp parallel
  {
    float* v = thread_buffer(0, kPoints * block * ic);
    float* m = thread_buffer(1, kPoints * block * oc);
    float* zeros = thread_buffer(2, ic);
    float* sink = thread_buffer(3, oc);
    std::fill(zeros, zeros + ic, 0.0f);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = b * block, last = std::min(count, first + block), size = last - first;
      transform_input(x, h, w, ic, top, left, tiles, first, last, zeros, v);
      for (int p = 0; p < kPoints; ++p)
        if (!sgemm('N', 'N', size, oc, ic, v + p * size * ic, ic, u.data() + p * ic * oc, oc,
                   0.0f, m + p * size * oc, oc))
          ok = false;
      transform_output(m, oh, ow, oc, tiles, first, last, sink, y);
    }
  }
  return ok;
}

// dw (3, 3, ic, oc) from x (N, h, w, ic) and dy (N, oh, ow, oc): each thread sums its blocks'
// dU = V^T (A dy A^T) per point, then the threads' sums are added in thread order.
inline bool kernel_gradient(const float* x, int64_t n, int64_t h, int64_t w, int64_t ic,
                            const float* dy, int64_t top, int64_t left, int64_t oh, int64_t ow,
                            int64_t oc, float* dw) {
  const Tiles tiles = Tiles::cover(n, oh, ow);
  const int64_t count = tiles.count(), block = kBlockTiles, size_u = kPoints * ic * oc;
  const int64_t blocks = (count + block - 1) / block;
  static std::vector<float> du;
  int threads = 1;
  std::atomic<bool> ok{true};
#pragma omp parallel
  {
#pragma omp single
    {
      threads = omp_get_num_threads();
      du.assign(threads * size_u, 0.0f);
    }
    const int id = omp_get_thread_num();
    float* v = thread_buffer(0, kPoints * block * ic);
    float* m = thread_buffer(1, kPoints * block * oc);
    float* zeros = thread_buffer(2, std::max(ic, oc));
    std::fill(zeros, zeros + std::max(ic, oc), 0.0f);
    float* mine = du.data() + id * size_u;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = b * block, last = std::min(count, first + block), size = last - first;
      transform_input(x, h, w, ic, top, left, tiles, first, last, zeros, v);
      transform_output_gradient(dy, oh, ow, oc, tiles, first, last, zeros, m);
      for (int p = 0; p < kPoints; ++p)
        if (!sgemm('T', 'N', ic, oc, size, v + p * size * ic, ic, m + p * size * oc, oc, 1.0f,
                   mine + p * ic * oc, oc))
          ok = false;
    }
  }
  for (int t = 1; t < threads; ++t) {
    const float* other = du.data() + t * size_u;
    for (int64_t i = 0; i < size_u; ++i) du[i] += other[i];
  }
  transform_kernel_gradient(du.data(), ic, oc, dw);
  return ok;
}

}  // namespace winograd
