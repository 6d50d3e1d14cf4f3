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
// OpenMP resolves to the libgomp torch has already loaded, so both share one thread pool.
#include <stdint.h>
#include <stdlib.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kMaxChunk = 8;   // tokens handled together: 8 floats fill one AVX register
constexpr int64_t kLutJBlock = 16;  // LUT rows built per work item
constexpr int64_t kOutBlock = 64;   // output rows per work item

// Up to kMaxChunk rows of one segment. xt is the chunk transposed ([ic][tc], zero-padded), so that the
// tc tokens of one input element sit side by side and the inner loops run over them with SIMD.
struct Chunk {
  int64_t segment, row0, rows, tc;
  std::vector<float> xt, lut;
};

template <typename Code>
const Code* expert_codes(const void* codes, int64_t expert, int64_t oc, int64_t J) {
  return static_cast<const Code*>(codes) + expert * oc * J;
}

// lut[(j * K + c) * TC + t] = x[t, j*d : (j+1)*d] . codebook[c], for j in [j0, j1).
template <int64_t TC>
void build_lut(const Chunk& ch, const float* cb, int64_t K, int64_t d, int64_t j0, int64_t j1, float* lut) {
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t c = 0; c < K; ++c) {
      float acc[TC] = {0};
      for (int64_t i = 0; i < d; ++i) {
        const float w = cb[c * d + i];
        const float* xv = ch.xt.data() + (j * d + i) * TC;
        for (int64_t t = 0; t < TC; ++t) acc[t] += w * xv[t];
      }
      std::copy(acc, acc + TC, lut + (j * K + c) * TC);
    }
  }
}

// One token: the codebook is read transposed ([d][K]) so that the loop over codes is contiguous.
void build_lut_1(const Chunk& ch, const float* cb_t, int64_t K, int64_t d, int64_t j0, int64_t j1, float* lut) {
  for (int64_t j = j0; j < j1; ++j) {
    float* row = lut + j * K;
    std::fill(row, row + K, 0.f);
    for (int64_t i = 0; i < d; ++i) {
      const float xv = ch.xt[j * d + i];
      const float* cbi = cb_t + i * K;
      for (int64_t c = 0; c < K; ++c) row[c] += xv * cbi[c];
    }
  }
}

// y[t, o] = sum_j lut[j, code[o, j], t]: the gather-add that replaces the GEMV.
template <typename Code, int64_t TC>
void gather_lut(const Chunk& ch, const Code* codes, int64_t J, int64_t K, int64_t oc, int64_t o0, int64_t o1,
                float* out) {
  const float* lut = ch.lut.data();
  for (int64_t o = o0; o < o1; ++o) {
    const Code* row = codes + o * J;
    float acc[TC] = {0};
    if (TC == 1) {  // four chains hide the load latency of a single token's sum
      float a1 = 0.f, a2 = 0.f, a3 = 0.f;
      int64_t j = 0;
      for (; j + 4 <= J; j += 4) {
        acc[0] += lut[j * K + row[j]];
        a1 += lut[(j + 1) * K + row[j + 1]];
        a2 += lut[(j + 2) * K + row[j + 2]];
        a3 += lut[(j + 3) * K + row[j + 3]];
      }
      for (; j < J; ++j) acc[0] += lut[j * K + row[j]];
      acc[0] += (a1 + a2) + a3;
    } else {
      for (int64_t j = 0; j < J; ++j) {
        const float* entry = lut + (j * K + row[j]) * TC;
        for (int64_t t = 0; t < TC; ++t) acc[t] += entry[t];
      }
    }
    for (int64_t t = 0; t < ch.rows; ++t) out[(ch.row0 + t) * oc + o] = acc[t];
  }
}

// Without a LUT (codebooks too large for one): y[t, o] = sum_j codebook[code[o, j]] . x[t, j*d : (j+1)*d].
template <typename Code, int64_t TC>
void gather_codebook(const Chunk& ch, const Code* codes, const float* cb, int64_t J, int64_t d, int64_t oc,
                     int64_t o0, int64_t o1, float* out) {
  for (int64_t o = o0; o < o1; ++o) {
    const Code* row = codes + o * J;
    float acc[TC] = {0};
    for (int64_t j = 0; j < J; ++j) {
      const float* w = cb + static_cast<int64_t>(row[j]) * d;
      const float* xv = ch.xt.data() + j * d * TC;
      for (int64_t i = 0; i < d; ++i)
        for (int64_t t = 0; t < TC; ++t) acc[t] += w[i] * xv[i * TC + t];
    }
    for (int64_t t = 0; t < ch.rows; ++t) out[(ch.row0 + t) * oc + o] = acc[t];
  }
}

std::vector<Chunk> make_chunks(const float* x, const int64_t* seg_bounds, int64_t S, int64_t ic) {
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t end = seg_bounds[2 * s + 1];
    for (int64_t r = seg_bounds[2 * s]; r < end; r += kMaxChunk) {
      const int64_t rows = std::min(kMaxChunk, end - r);
      const int64_t tc = rows == 1 ? 1 : rows == 2 ? 2 : rows <= 4 ? 4 : 8;
      Chunk ch{s, r, rows, tc, std::vector<float>(ic * tc, 0.f), {}};
      for (int64_t t = 0; t < rows; ++t)
        for (int64_t k = 0; k < ic; ++k) ch.xt[k * tc + t] = x[(r + t) * ic + k];
      chunks.push_back(std::move(ch));
    }
  }
  return chunks;
}

void build_luts(std::vector<Chunk>& chunks, const float* codebooks, int64_t K, int64_t d, int64_t J,
                int64_t threads) {
  for (auto& ch : chunks) ch.lut.resize(J * K * ch.tc);
  std::vector<std::vector<float>> cb_t(chunks.size());  // transposed codebooks for single-token chunks
  for (size_t q = 0; q < chunks.size(); ++q) {
    if (chunks[q].tc != 1) continue;
    const float* cb = codebooks + chunks[q].segment * K * d;
    cb_t[q].resize(K * d);
    for (int64_t c = 0; c < K; ++c)
      for (int64_t i = 0; i < d; ++i) cb_t[q][i * K + c] = cb[c * d + i];
  }
  const int64_t blocks = (J + kLutJBlock - 1) / kLutJBlock;
  const int64_t items = static_cast<int64_t>(chunks.size()) * blocks;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (int64_t item = 0; item < items; ++item) {
    Chunk& ch = chunks[item / blocks];
    const int64_t j0 = (item % blocks) * kLutJBlock, j1 = std::min(J, j0 + kLutJBlock);
    const float* cb = codebooks + ch.segment * K * d;
    switch (ch.tc) {
      case 1: build_lut_1(ch, cb_t[item / blocks].data(), K, d, j0, j1, ch.lut.data()); break;
      case 2: build_lut<2>(ch, cb, K, d, j0, j1, ch.lut.data()); break;
      case 4: build_lut<4>(ch, cb, K, d, j0, j1, ch.lut.data()); break;
      default: build_lut<8>(ch, cb, K, d, j0, j1, ch.lut.data()); break;
    }
  }
}

template <typename Code, int64_t TC>
void run_block(const Chunk& ch, const Code* codes, const float* cb, int64_t J, int64_t K, int64_t d, int64_t oc,
               int64_t o0, int64_t o1, bool use_lut, float* out) {
  if (use_lut) gather_lut<Code, TC>(ch, codes, J, K, oc, o0, o1, out);
  else gather_codebook<Code, TC>(ch, codes, cb, J, d, oc, o0, o1, out);
}

template <typename Code>
void decode(const float* x, const int64_t* seg_bounds, int64_t S, const void* codes, const int64_t* seg_expert,
            const float* codebooks, int64_t oc, int64_t ic, int64_t K, int64_t d, bool use_lut, int64_t threads,
            float* out) {
  const int64_t J = ic / d;
  std::vector<Chunk> chunks = make_chunks(x, seg_bounds, S, ic);
  if (use_lut) build_luts(chunks, codebooks, K, d, J, threads);
  const int64_t blocks = (oc + kOutBlock - 1) / kOutBlock;
  const int64_t items = static_cast<int64_t>(chunks.size()) * blocks;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (int64_t item = 0; item < items; ++item) {
    const Chunk& ch = chunks[item / blocks];
    const int64_t o0 = (item % blocks) * kOutBlock, o1 = std::min(oc, o0 + kOutBlock);
    const Code* expert = expert_codes<Code>(codes, seg_expert[ch.segment], oc, J);
    const float* cb = codebooks + ch.segment * K * d;
    switch (ch.tc) {
      case 1: run_block<Code, 1>(ch, expert, cb, J, K, d, oc, o0, o1, use_lut, out); break;
      case 2: run_block<Code, 2>(ch, expert, cb, J, K, d, oc, o0, o1, use_lut, out); break;
      case 4: run_block<Code, 4>(ch, expert, cb, J, K, d, oc, o0, o1, use_lut, out); break;
      default: run_block<Code, 8>(ch, expert, cb, J, K, d, oc, o0, o1, use_lut, out); break;
    }
  }
}

template <typename Code>
void dequantize(const Code* codes, int64_t rows, int64_t J, const float* cb, int64_t d, int64_t threads,
                float* out) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < J; ++j) std::copy(cb + codes[r * J + j] * d, cb + (codes[r * J + j] + 1) * d,
                                              out + (r * J + j) * d);
}

}  // namespace

extern "C" {

// Decode: out[seg rows] = x[seg rows] @ dequant(codes[expert], codebook)^T for every segment.
// use_lut selects the lookup-table GEMV (small K) or the direct codebook gather (large K). Returns 0.
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

}  // extern "C"
