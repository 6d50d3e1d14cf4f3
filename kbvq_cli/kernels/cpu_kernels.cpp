// Kernels of the `cpu` backend, built once per machine by kbvq_cli/kernels/cpu_backend.py into a plain shared
// library (no torch headers: those cost ~45 s of compile, this file ~2 s) and called through ctypes.
//
// Layouts (all row-major, float32 unless said):
//   x          [N, ic]        input rows grouped by segment (a segment is the rows routed to one expert)
//   seg_bounds [S, 2] int64   segment s owns rows seg_bounds[2s] .. seg_bounds[2s+1] of x and out
//   codes      [n, oc, J]     uint8 or uint16 (code_bytes 1 or 2), J = ic / d; one expert is oc * J codes
//   seg_expert [S] int64      the expert of each segment
//   codebooks  [S, K, d]      the codebook of each segment's expert, already float32
//   out        [N, oc]
// Decode never forms a weight matrix: per code it either reads the codebook row (d floats, from L1 for
// K=256) and multiplies it with x's group, or, with a lookup table, adds a precomputed x-group . code dot.
// OpenMP resolves to the libgomp torch has already loaded, so both share one thread pool.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxChunk = 8;    // tokens of one expert handled together
constexpr int64_t kLutJBlock = 16;  // table rows built per work item
constexpr int64_t kOutBlock = 64;   // output rows per work item

template <int64_t V>
using Const = std::integral_constant<int64_t, V>;

template <int64_t N>
struct VecOf {  // N floats as one SIMD value: GCC/Clang vector extension, no intrinsics, any target
  typedef float type __attribute__((vector_size(N * sizeof(float))));
};
template <int64_t N>
using Vec = typename VecOf<N>::type;  // (an alias template straight to the attribute drops it in GCC)

template <int64_t N>
inline Vec<N> load(const float* p) {
  Vec<N> v;
  memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}

struct Chunk {  // rows row0 .. row0+rows of one segment, handled as tc (1, 2, 4 or 8) tokens
  int64_t segment, row0, rows, tc;
};

// Per calling thread, grown and never shrunk: fresh buffers would cost page faults on every call.
float* scratch(size_t floats) {
  static thread_local std::vector<float> arena;
  if (arena.size() < floats) arena.resize(floats);
  return arena.data();
}

// y[o] = sum_j codebook[code[o, j]] . x[j*D : (j+1)*D] for one token: one D-wide multiply-add per code, in
// four independent chains.
template <typename Code, int64_t D>
void gather_one(const float* x, const Code* codes, const float* cb, int64_t J, int64_t o0, int64_t o1,
                float* out) {
  for (int64_t o = o0; o < o1; ++o) {
    const Code* row = codes + o * J;
    Vec<D> acc[4] = {};
    int64_t j = 0;
    for (; j + 4 <= J; j += 4)
      for (int64_t q = 0; q < 4; ++q)
        acc[q] += load<D>(cb + static_cast<int64_t>(row[j + q]) * D) * load<D>(x + (j + q) * D);
    for (; j < J; ++j) acc[0] += load<D>(cb + static_cast<int64_t>(row[j]) * D) * load<D>(x + j * D);
    const Vec<D> sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    float total = 0.f;
    for (int64_t i = 0; i < D; ++i) total += sum[i];
    out[o] = total;
  }
}

// Two D-wide vectors side by side as one 2D-wide one (a register shuffle, not a trip through memory).
template <int64_t D>
inline Vec<2 * D> concat(Vec<D> a, Vec<D> b) {
  if constexpr (D == 2) return __builtin_shufflevector(a, b, 0, 1, 2, 3);
  else return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7);
}

// Eight codes read with one load (a 64-bit word per 8 or 4 codes) and taken apart in registers: a load per
// code, next to the codebook row's, made the gather load-bound (about 1.1 cycles a code on AVX2).
template <typename Code>
struct EightCodes {
  uint64_t words[sizeof(Code)];
  explicit EightCodes(const Code* p) { memcpy(words, p, sizeof(words)); }
  int64_t operator[](int q) const {
    if constexpr (sizeof(Code) == 1) return static_cast<int64_t>((words[0] >> (8 * q)) & 0xff);
    else return static_cast<int64_t>((words[q / 4] >> (16 * (q % 4))) & 0xffff);
  }
};

// The codebook rows of codes c[q0 .. q0 + 8/D) side by side: 8 floats that line up with 8 contiguous floats of x.
template <typename Code, int64_t D>
inline Vec<8> codebook_rows(const float* cb, const EightCodes<Code>& c, int q0) {
  auto row = [&](int q) { return load<D>(cb + c[q0 + q] * D); };
  if constexpr (D == 4) return concat<4>(row(0), row(1));
  else return concat<4>(concat<2>(row(0), row(1)), concat<2>(row(2), row(3)));
}

// gather_one for D = 2 or 4, a vector of 8 floats at a time: 8 / D codes share one multiply-add, two output
// rows share each load of x, and each row's codes come 8 to a load.
template <typename Code, int64_t D>
void gather_one_wide(const float* x, const Code* codes, const float* cb, int64_t J, int64_t o0, int64_t o1,
                     float* out) {
  constexpr int64_t P = 8 / D;  // codes per vector
  const int64_t J_wide = J - J % 8;
  auto tail = [&](const Code* row) {  // the codes after the last full 8
    Vec<D> acc = {};
    for (int64_t j = J_wide; j < J; ++j) acc += load<D>(cb + static_cast<int64_t>(row[j]) * D) * load<D>(x + j * D);
    float total = 0.f;
    for (int64_t i = 0; i < D; ++i) total += acc[i];
    return total;
  };
  auto lanes = [](Vec<8> v) {
    float total = 0.f;
    for (int64_t i = 0; i < 8; ++i) total += v[i];
    return total;
  };
  int64_t o = o0;
  for (; o + 2 <= o1; o += 2) {
    const Code* r0 = codes + o * J;
    const Code* r1 = r0 + J;
    Vec<8> a0 = {}, b0 = {}, a1 = {}, b1 = {};  // two chains per row, so the adds do not wait on each other
    for (int64_t j = 0; j < J_wide; j += 8) {
      const EightCodes<Code> c0(r0 + j), c1(r1 + j);
      for (int q = 0; q < 8; q += 2 * P) {
        const Vec<8> x0 = load<8>(x + (j + q) * D), x1 = load<8>(x + (j + q + P) * D);
        a0 += codebook_rows<Code, D>(cb, c0, q) * x0;
        a1 += codebook_rows<Code, D>(cb, c1, q) * x0;
        b0 += codebook_rows<Code, D>(cb, c0, q + P) * x1;
        b1 += codebook_rows<Code, D>(cb, c1, q + P) * x1;
      }
    }
    out[o] = lanes(a0 + b0) + tail(r0);
    out[o + 1] = lanes(a1 + b1) + tail(r1);
  }
  if (o < o1) gather_one<Code, D>(x, codes, cb, J, o, o1, out);
}

// The same for TC tokens (x_rows[t] is token t's row): each codebook row is loaded once for all of them.
// The loop over j is blocked so that the slices of x it reads (16 KiB) stay in L1 across the output rows.
template <typename Code, int64_t TC, int64_t D>
void gather_tokens(const float* const* x_rows, const Code* codes, const float* cb, int64_t J, int64_t oc,
                   int64_t o0, int64_t o1, int64_t rows, float* out) {
  constexpr int64_t kJBlock = 4096 / (D * TC), kChains = TC >= 4 ? 1 : 4 / TC;
  float partial[kOutBlock][TC] = {};
  for (int64_t j0 = 0; j0 < J; j0 += kJBlock) {
    const int64_t j1 = std::min(J, j0 + kJBlock);
    for (int64_t o = o0; o < o1; ++o) {
      const Code* row = codes + o * J;
      Vec<D> acc[kChains][TC] = {};
      auto step = [&](int64_t j, Vec<D>(&a)[TC]) {
        const Vec<D> w = load<D>(cb + static_cast<int64_t>(row[j]) * D);
        for (int64_t t = 0; t < TC; ++t) a[t] += w * load<D>(x_rows[t] + j * D);
      };
      int64_t j = j0;
      for (; j + kChains <= j1; j += kChains)
        for (int64_t q = 0; q < kChains; ++q) step(j + q, acc[q]);
      for (; j < j1; ++j) step(j, acc[0]);
      for (int64_t q = 0; q < kChains; ++q)
        for (int64_t t = 0; t < TC; ++t)
          for (int64_t i = 0; i < D; ++i) partial[o - o0][t] += acc[q][t][i];
    }
  }
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t t = 0; t < rows; ++t) out[t * oc + o] = partial[o - o0][t];
}

// Any d other than 2, 4, 8, plainly: correct, not tuned.
template <typename Code>
void gather_any(const float* const* x_rows, const Code* codes, const float* cb, int64_t J, int64_t d, int64_t oc,
                int64_t o0, int64_t o1, int64_t rows, float* out) {
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t t = 0; t < rows; ++t) {
      float acc = 0.f;
      for (int64_t j = 0; j < J; ++j)
        for (int64_t i = 0; i < d; ++i) acc += cb[codes[o * J + j] * d + i] * x_rows[t][j * d + i];
      out[t * oc + o] = acc;
    }
}

// The lookup-table GEMV for one token: lut[j * K + c] = x[j*d : (j+1)*d] . codebook[c] (cb_t is the
// codebook transposed, [d][K], so the loop over codes is contiguous), then y[o] = sum_j lut[j, code[o, j]].
void build_lut(const float* x, const float* cb_t, int64_t K, int64_t d, int64_t j0, int64_t j1, float* lut) {
  for (int64_t j = j0; j < j1; ++j) {
    float* row = lut + j * K;
    std::fill(row, row + K, 0.f);
    for (int64_t i = 0; i < d; ++i) {
      const float xv = x[j * d + i];
      const float* cbi = cb_t + i * K;
      for (int64_t c = 0; c < K; ++c) row[c] += xv * cbi[c];
    }
  }
}

template <typename Code>
void gather_lut(const float* lut, const Code* codes, int64_t J, int64_t K, int64_t o0, int64_t o1, float* out) {
  for (int64_t o = o0; o < o1; ++o) {
    const Code* row = codes + o * J;
    float acc[4] = {};  // four chains, so the adds do not wait on each other
    int64_t j = 0;
    for (; j + 4 <= J; j += 4)
      for (int64_t q = 0; q < 4; ++q) acc[q] += lut[(j + q) * K + row[j + q]];
    for (; j < J; ++j) acc[0] += lut[j * K + row[j]];
    out[o] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
}

template <typename F>
void with_tc(int64_t tc, F&& f) {
  switch (tc) {
    case 1: f(Const<1>{}); break;
    case 2: f(Const<2>{}); break;
    case 4: f(Const<4>{}); break;
    default: f(Const<8>{}); break;
  }
}

template <typename F>
void with_d(int64_t d, F&& f) {  // the usual vector lengths at compile time, others at run time (Const<0>)
  switch (d) {
    case 2: f(Const<2>{}); break;
    case 4: f(Const<4>{}); break;
    case 8: f(Const<8>{}); break;
    default: f(Const<0>{}); break;
  }
}

std::vector<Chunk> make_chunks(const int64_t* seg_bounds, int64_t S) {
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t end = seg_bounds[2 * s + 1];
    for (int64_t r = seg_bounds[2 * s]; r < end; r += kMaxChunk) {
      const int64_t rows = std::min(kMaxChunk, end - r);
      chunks.push_back({s, r, rows, rows == 1 ? 1 : rows == 2 ? 2 : rows <= 4 ? 4 : 8});
    }
  }
  return chunks;
}

// Where each of a chunk's kMaxChunk token slots reads x: row r of the chunk reads x row source[r] (row r when
// source is null); padding slots repeat the last row, and their sums are dropped.
inline void chunk_rows(const Chunk& ch, const float* x, int64_t ic, const int64_t* source, const float** x_rows) {
  for (int64_t t = 0; t < kMaxChunk; ++t) {
    const int64_t r = ch.row0 + std::min(t, ch.rows - 1);
    x_rows[t] = x + (source ? source[r] : r) * ic;
  }
}

// Output rows o0 .. o1 of one chunk, without a table, by the kernel for its token count and d: token t's
// result for row o lands at out[t * stride + o].
template <typename Code>
void gather_block(const Chunk& ch, const float* const* x_rows, const Code* codes, const float* cb, int64_t J,
                  int64_t d, int64_t stride, int64_t o0, int64_t o1, float* out) {
  with_tc(ch.tc, [&](auto tc) { with_d(d, [&](auto dc) {
    constexpr int64_t TC = decltype(tc)::value, D = decltype(dc)::value;
    if constexpr (D == 0) gather_any<Code>(x_rows, codes, cb, J, d, stride, o0, o1, ch.rows, out);
    else if constexpr (TC == 1 && D < 8) gather_one_wide<Code, D>(x_rows[0], codes, cb, J, o0, o1, out);
    else if constexpr (TC == 1) gather_one<Code, D>(x_rows[0], codes, cb, J, o0, o1, out);
    else gather_tokens<Code, TC, D>(x_rows, codes, cb, J, stride, o0, o1, ch.rows, out);
  }); });
}

// Chunks run one after another, each spread over all threads, so a table stays in cache between being built
// and being read. use_lut: single-token chunks go through the table (slower than gather_one on AVX2, see
// docs/kernels.md, so the Python side leaves it off by default).
template <typename Code>
void decode(const float* x, const int64_t* seg_bounds, int64_t S, const void* codes, const int64_t* seg_expert,
            const float* codebooks, int64_t oc, int64_t ic, int64_t K, int64_t d, bool use_lut, int64_t threads,
            float* out) {
  const int64_t J = ic / d, lut_blocks = (J + kLutJBlock - 1) / kLutJBlock;
  const int64_t out_blocks = (oc + kOutBlock - 1) / kOutBlock;
  const std::vector<Chunk> chunks = make_chunks(seg_bounds, S);
  float* cb_t = use_lut ? scratch(K * d + J * K) : nullptr;
  float* lut = use_lut ? cb_t + K * d : nullptr;
#pragma omp parallel num_threads(threads)
  for (const Chunk& ch : chunks) {
    const float* cb = codebooks + ch.segment * K * d;
    const Code* expert = static_cast<const Code*>(codes) + seg_expert[ch.segment] * oc * J;
    const bool table = use_lut && ch.tc == 1;
    if (table) {
#pragma omp single
      for (int64_t c = 0; c < K; ++c)
        for (int64_t i = 0; i < d; ++i) cb_t[i * K + c] = cb[c * d + i];
#pragma omp for schedule(static)
      for (int64_t b = 0; b < lut_blocks; ++b)
        build_lut(x + ch.row0 * ic, cb_t, K, d, b * kLutJBlock, std::min(J, (b + 1) * kLutJBlock), lut);
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < out_blocks; ++b) {
      const int64_t o0 = b * kOutBlock, o1 = std::min(oc, o0 + kOutBlock);
      if (table) gather_lut<Code>(lut, expert, J, K, o0, o1, out + ch.row0 * oc);
      else {
        const float* x_rows[kMaxChunk];
        chunk_rows(ch, x, ic, nullptr, x_rows);
        gather_block<Code>(ch, x_rows, expert, cb, J, d, oc, o0, o1, out + ch.row0 * oc);
      }
    }
  }
}

// Rows r0 .. r1 of a tile. A function of its own, taking everything by value: inside the OpenMP region's
// lambda every captured reference was reloaded after each store (a float store may alias them), which
// with a run-time d calling memmove made about 3 ns a code; as a plain loop with D fixed it is one vector
// load and store.
template <typename Code, int64_t D>
void dequantize_rows(const Code* __restrict codes, int64_t r0, int64_t r1, int64_t J, const float* __restrict cb,
                     int64_t d, float* __restrict out) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = 0; j < J; ++j) {
      const float* w = cb + static_cast<int64_t>(codes[r * J + j]) * (D ? D : d);
      float* target = out + (r * J + j) * (D ? D : d);
      if constexpr (D == 0) std::copy(w, w + d, target);
      else {
        const Vec<D> v = load<D>(w);
        memcpy(target, &v, sizeof(v));
      }
    }
}

template <typename Code>
void dequantize(const Code* codes, int64_t rows, int64_t J, const float* cb, int64_t d, int64_t threads,
                float* out) {
  with_d(d, [&](auto dc) {
    constexpr int64_t D = decltype(dc)::value;
    constexpr int64_t kRowBlock = 16;
    const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b)
      dequantize_rows<Code, D>(codes, b * kRowBlock, std::min(rows, (b + 1) * kRowBlock), J, cb, d, out);
  });
}


// ------------------------------------------------------------------ fused decode projections
// A whole quantized projection for decode-sized segments, in one parallel region and with no barrier inside:
//   y[r, o] = (1 + scale[e, o]) * (vq[r, o] + low_rank[r, o]) + shift[e, o]
// written to out[r] or, for a down projection, accumulated as out[target[r]] += weight[r] * y[r]. The
// 16-bit stored parts (codebooks, bases, coefficients, scale, shift) are read as they are, so no converted
// copies are made on the Python side; one call replaces some twenty small torch ops, each of which may wake
// the thread pool (about 0.1 ms apiece under OMP_WAIT_POLICY=PASSIVE).

enum DType : int64_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct Part {  // a stored tensor: null data means absent
  const void* data;
  int64_t dtype;
};

// One projection over its segments. Layouts: x [x_rows, ic]; codes [n, oc, J]; codebook [n, K, d];
// scale, shift [n, oc]; input side: basis [rank, ic], coeffs [n, oc, rank]; output side: basis [rank, oc],
// coeffs [n, rank, ic]; out [N, oc], or [targets, oc] when target is set.
struct Job {
  const float* x;
  int64_t x_rows;
  const int64_t* source;  // [N] the row of x each sorted row reads; null: row r reads row r
  int64_t rows;           // N
  const int64_t* seg_bounds;
  const int64_t* seg_expert;
  int64_t segments;
  const void* codes;
  int64_t code_bytes, oc, ic, K, d;
  Part codebook, scale, shift;
  int64_t output_side, rank;  // rank 0: no low-rank part
  Part basis, coeffs;
  float* out;
  const int64_t* target;  // [N] or null
  const float* weight;    // [N], with target
};

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, rest = h & 0x7fff;
  uint32_t bits;
  if (rest >= 0x7c00) {
    bits = sign | 0x7f800000 | ((rest & 0x3ff) << 13);  // inf, nan
  } else {
    float f;  // exponent and mantissa moved into place, re-biased by 2^112: exact for normals and subnormals
    const uint32_t shifted = rest << 13;
    memcpy(&f, &shifted, 4);
    f *= 0x1p112f;
    memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float out;
  memcpy(&out, &bits, 4);
  return out;
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// p's elements start .. start + count as float32, into out: one loop per dtype, so each vectorises (float16
// through the compiler's _Float16, which is F16C's vcvtph2ps on x86, where it has one).
void convert(const Part& p, int64_t start, int64_t count, float* __restrict out) {
  const uint16_t* half = static_cast<const uint16_t*>(p.data) + start;
  switch (p.dtype) {
    case kF16:
#if defined(__FLT16_MAX__)
      for (int64_t i = 0; i < count; ++i) {
        _Float16 h;
        memcpy(&h, half + i, 2);
        out[i] = static_cast<float>(h);
      }
#else
      for (int64_t i = 0; i < count; ++i) out[i] = half_to_float(half[i]);
#endif
      break;
    case kBF16:
      for (int64_t i = 0; i < count; ++i) out[i] = bf16_to_float(half[i]);
      break;
    default:
      memcpy(out, static_cast<const float*>(p.data) + start, count * sizeof(float));
  }
}

// a . b over n floats, in 8-wide partial sums (a plain float loop would be one serial chain of n adds).
inline float dot(const float* a, const float* b, int64_t n) {
  Vec<8> acc = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc += load<8>(a + i) * load<8>(b + i);
  float total = 0.f;
  for (int64_t lane = 0; lane < 8; ++lane) total += acc[lane];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// What a job needs before its output rows can be computed, made once per call: the codebooks of its
// segments' experts as float32, and the low-rank intermediate (input side: basis @ x per row of x, shared by
// all experts; output side: coeffs[e] @ x per sorted row).
struct Prepared {
  std::vector<float> codebooks;  // [segments, K, d]
  std::vector<float> inner;      // [x_rows or rows, rank]
  std::vector<Chunk> chunks;
};

void prepare(const Job& job, Prepared& p) {
  const int64_t kd = job.K * job.d;
  p.codebooks.resize(job.segments * kd);
  for (int64_t s = 0; s < job.segments; ++s) convert(job.codebook, job.seg_expert[s] * kd, kd, &p.codebooks[s * kd]);
  p.chunks = make_chunks(job.seg_bounds, job.segments);
  if (job.rank == 0) return;
  std::vector<float> row(job.ic);
  if (!job.output_side) {  // inner[t, k] = basis[k] . x[t]
    p.inner.assign(job.x_rows * job.rank, 0.f);
    for (int64_t k = 0; k < job.rank; ++k) {
      convert(job.basis, k * job.ic, job.ic, row.data());
      for (int64_t t = 0; t < job.x_rows; ++t) p.inner[t * job.rank + k] = dot(row.data(), job.x + t * job.ic, job.ic);
    }
  } else {  // inner[r, k] = coeffs[e, k] . x[source(r)]
    p.inner.assign(job.rows * job.rank, 0.f);
    for (int64_t s = 0; s < job.segments; ++s) {
      const int64_t e = job.seg_expert[s];
      for (int64_t k = 0; k < job.rank; ++k) {
        convert(job.coeffs, (e * job.rank + k) * job.ic, job.ic, row.data());
        for (int64_t r = job.seg_bounds[2 * s]; r < job.seg_bounds[2 * s + 1]; ++r) {
          p.inner[r * job.rank + k] = dot(row.data(), job.x + (job.source ? job.source[r] : r) * job.ic, job.ic);
        }
      }
    }
  }
}

// Output rows o0 .. o1 of a job, for all its chunks in order (so accumulated targets are summed in one fixed
// order whatever the thread count). The block's 16-bit parts are converted once into float32 scratch.
template <typename Code>
void project_block(const Job& job, const Prepared& p, int64_t o0, int64_t o1) {
  const int64_t J = job.ic / job.d, width = o1 - o0, rank = job.rank;
  const Code* codes = static_cast<const Code*>(job.codes);
  float vq[kMaxChunk * kOutBlock], scale[kOutBlock], shift[kOutBlock];
  // low-rank factor of these rows, [rank][width]: the basis (output side, every expert's) or the chunk's
  // expert's coefficients transposed (input side), so the sum over the rank runs along the rows, vectorised
  float* factor = scratch(2 * rank * width);
  float* stored = factor + rank * width;
  if (rank && job.output_side)
    for (int64_t k = 0; k < rank; ++k) convert(job.basis, k * job.oc + o0, width, factor + k * width);
  int64_t converted = -1;  // the expert whose coefficients, scale and shift are in scratch
  for (const Chunk& ch : p.chunks) {
    const int64_t e = job.seg_expert[ch.segment];
    if (e != converted) {
      if (rank && !job.output_side) {
        convert(job.coeffs, (e * job.oc + o0) * rank, width * rank, stored);
        for (int64_t i = 0; i < width; ++i)
          for (int64_t k = 0; k < rank; ++k) factor[k * width + i] = stored[i * rank + k];
      }
      if (job.scale.data) convert(job.scale, e * job.oc + o0, width, scale);
      if (job.shift.data) convert(job.shift, e * job.oc + o0, width, shift);
      converted = e;
    }
    const Code* block = codes + (e * job.oc + o0) * J;
    const float* cb = p.codebooks.data() + ch.segment * job.K * job.d;
    const float* x_rows[kMaxChunk];
    chunk_rows(ch, job.x, job.ic, job.source, x_rows);
    gather_block<Code>(ch, x_rows, block, cb, J, job.d, kOutBlock, 0, width, vq);
    for (int64_t t = 0; t < ch.rows; ++t) {
      const int64_t r = ch.row0 + t;
      float* v = vq + t * kOutBlock;
      if (rank) {
        const float* inner = p.inner.data() + (job.output_side ? r : (job.source ? job.source[r] : r)) * rank;
        for (int64_t k = 0; k < rank; ++k)
          for (int64_t i = 0; i < width; ++i) v[i] += inner[k] * factor[k * width + i];
      }
      if (job.scale.data)
        for (int64_t i = 0; i < width; ++i) v[i] *= 1.f + scale[i];
      if (job.shift.data)
        for (int64_t i = 0; i < width; ++i) v[i] += shift[i];
      if (job.target) {
        float* y = job.out + job.target[r] * job.oc + o0;
        const float w = job.weight[r];
        for (int64_t i = 0; i < width; ++i) y[i] += w * v[i];
      } else {
        memcpy(job.out + r * job.oc + o0, v, width * sizeof(float));
      }
    }
  }
}

void project(const Job* jobs, int64_t count, int64_t threads) {
  std::vector<Prepared> prepared(count);
  std::vector<std::pair<int64_t, int64_t>> items;  // (job, output block)
  for (int64_t j = 0; j < count; ++j) {
    prepare(jobs[j], prepared[j]);
    for (int64_t b = 0; b * kOutBlock < jobs[j].oc; ++b) items.push_back({j, b});
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  // Dynamic: on a machine shared with other work one thread may start late or be preempted, and the other
  // then takes its blocks instead of waiting at the end. Each block owns its output columns and sums its
  // chunks in order, so which thread runs it changes no bit.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t i = 0; i < n_items; ++i) {
    const Job& job = jobs[items[i].first];
    const int64_t o0 = items[i].second * kOutBlock, o1 = std::min(job.oc, o0 + kOutBlock);
    if (job.code_bytes == 1) project_block<uint8_t>(job, prepared[items[i].first], o0, o1);
    else project_block<uint16_t>(job, prepared[items[i].first], o0, o1);
  }
}

// kbvq_cluster_sums' pass, the vector length a compile-time constant where `with_d` makes it one.
template <int64_t D>
void cluster_sums(const float* __restrict points, const int64_t* __restrict indices, int64_t n, int64_t d_run,
                  double* __restrict sums, int64_t* __restrict counts) {
  const int64_t d = D ? D : d_run;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = indices[i];
    counts[c] += 1;
    double* sum = sums + c * d;
    const float* point = points + i * d;
    for (int64_t j = 0; j < d; ++j) sum[j] += static_cast<double>(point[j]);
  }
}

}  // namespace

extern "C" {

// Decode: out[seg rows] = x[seg rows] @ dequant(codes[expert], codebook)^T for every segment.
// use_lut sends single-token chunks through the lookup-table GEMV; everything else gathers codebook rows.
// Returns 0.
int kbvq_decode(const float* x, const int64_t* seg_bounds, int64_t S, const void* codes, int64_t code_bytes,
                const int64_t* seg_expert, const float* codebooks, int64_t oc, int64_t ic, int64_t K, int64_t d,
                int64_t use_lut, int64_t threads, float* out) {
  if (d <= 0 || ic % d != 0 || (code_bytes != 1 && code_bytes != 2)) return 1;
  if (code_bytes == 1)
    decode<uint8_t>(x, seg_bounds, S, codes, seg_expert, codebooks, oc, ic, K, d, use_lut != 0, threads, out);
  else
    decode<uint16_t>(x, seg_bounds, S, codes, seg_expert, codebooks, oc, ic, K, d, use_lut != 0, threads, out);
  return 0;
}

// Prefill tile: out [rows, J*d] = codebook[codes[r, j]] laid side by side, for codes [rows, J]. Returns 0.
int kbvq_dequantize(const void* codes, int64_t code_bytes, int64_t rows, int64_t J, const float* codebook,
                    int64_t d, int64_t threads, float* out) {
  if (code_bytes == 1) dequantize(static_cast<const uint8_t*>(codes), rows, J, codebook, d, threads, out);
  else if (code_bytes == 2) dequantize(static_cast<const uint16_t*>(codes), rows, J, codebook, d, threads, out);
  else return 1;
  return 0;
}

// Fused decode projections (see `Job`): every job's segments must have been checked by the caller. Returns
// 0, or 1 for a job it cannot take.
int kbvq_project(const Job* jobs, int64_t count, int64_t threads) {
  for (int64_t j = 0; j < count; ++j) {
    const Job& job = jobs[j];
    if (job.d <= 0 || job.ic % job.d != 0 || (job.code_bytes != 1 && job.code_bytes != 2) || job.rank < 0 ||
        (job.rank && (!job.basis.data || !job.coeffs.data)) || (job.target && !job.weight))
      return 1;
  }
  project(jobs, count, threads);
  return 0;
}

// The centroid sums of vq's k-means (stages/vq/core.py `cluster_sums`): sums [k, d] float64 and counts [k]
// of points [n, d] float32 by their cluster indices [n]. One sequential pass, each (cluster, coordinate)
// sum adding its points in index order in double: the order and precision of
// `torch.bincount(indices, weights=column)`, so the sums are bit-identical to it, in one pass over the
// points instead of d + 1. Returns 0, or 1 for an index outside [0, k) (sums and counts then unusable).
int kbvq_cluster_sums(const float* points, const int64_t* indices, int64_t n, int64_t d, int64_t k,
                      double* sums, int64_t* counts) {
  for (int64_t i = 0; i < n; ++i)
    if (indices[i] < 0 || indices[i] >= k) return 1;
  memset(sums, 0, sizeof(double) * k * d);
  memset(counts, 0, sizeof(int64_t) * k);
  with_d(d, [&](auto dim) { cluster_sums<decltype(dim)::value>(points, indices, n, d, sums, counts); });
  return 0;
}

}  // extern "C"
