// dasm._C: CPU implementations and Python bindings.
//
// accumulate_class_grads   per-layer gradients -> rows of a flat [C, P] float32 buffer
//                          (CPU here; CUDA in accumulate_cuda.cu when built with CUDA).
// inrp_forward / inrp_backward / inrp_double_backward
//                          instance norm (affine) + ReLU (+ 2x2 average pool) on NCHW float32:
//                          the forward, its backward, and the backward of that backward, each
//                          one fused pass per (sample, channel) plane that stays in cache.
//
// Notation per plane (M = H*W pixels): xh = (z - mean) * rstd, y = w*xh + b, mask = y > 0,
// dr = pool^T(g) (g / 4 spread over each 2x2 cell; 0 outside full cells), dxh = w * mask * dr,
// A = mean(dxh), B = mean(dxh * xh), gz = rstd * (dxh - A - xh * B).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <string>
#include <vector>

#ifdef DASM_WITH_CUDA
void accumulate_class_grads_cuda(torch::Tensor buffer, const std::vector<torch::Tensor>& grads,
                                 const std::vector<int64_t>& offsets, torch::Tensor classes,
                                 double scale);
#endif

namespace {

// Error messages hand c10::str strings only: numbers through num(), devices through str(), dtypes
// through toString(). On the H200 machine (extension built by its /opt/gcc g++, torch 2.11) a
// failed check that streamed an integer into c10::str's ostringstream crashed the process with
// SIGSEGV inside `ss << t` (cuda-gdb: c10::detail::_str<unsigned long>), where a dtype's name
// streamed fine: a bad argument must be one RuntimeError, not a dead interpreter.
template <typename T>
std::string num(T value) { return std::to_string(value); }

// ------------------------------------------------------------------ accumulate_class_grads
// Checks every argument on the host; returns the class rows as a contiguous CPU tensor, the
// one both device paths read.
torch::Tensor check_accumulate(const torch::Tensor& buffer,
                               const std::vector<torch::Tensor>& grads,
                               const std::vector<int64_t>& offsets, const torch::Tensor& classes) {
  TORCH_CHECK(buffer.dim() == 2, "accumulate_class_grads: buffer must be 2-D [C, P], got ",
              num(buffer.dim()), "-D");
  TORCH_CHECK(buffer.scalar_type() == torch::kFloat32,
              "accumulate_class_grads: buffer must be float32, got ",
              c10::toString(buffer.scalar_type()));
  TORCH_CHECK(buffer.is_contiguous(), "accumulate_class_grads: buffer must be contiguous");
  TORCH_CHECK(classes.dim() == 1 && classes.scalar_type() == torch::kInt64,
              "accumulate_class_grads: classes must be a 1-D int64 tensor");
  // class indices stay on the host, where their range is checked (a device assert would kill
  // the CUDA context); the CUDA path uploads them with its work table
  TORCH_CHECK(classes.is_cpu(), "accumulate_class_grads: classes must be a CPU tensor, got ",
              classes.device().str());
  const int64_t C = buffer.size(0);
  const auto cls = classes.contiguous();
  const int64_t* c = cls.data_ptr<int64_t>();
  for (int64_t j = 0; j < cls.size(0); ++j)
    TORCH_CHECK(c[j] >= 0 && c[j] < C, "accumulate_class_grads: class index ", num(c[j]),
                " out of range [0, ", num(C), ")");
  TORCH_CHECK(grads.size() == offsets.size(), "accumulate_class_grads: ", num(grads.size()),
              " gradients but ", num(offsets.size()), " offsets");
  const int64_t B = classes.size(0), P = buffer.size(1);
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    TORCH_CHECK(g.device() == buffer.device(), "accumulate_class_grads: gradient ", num(i),
                " is on ", g.device().str(), ", buffer on ", buffer.device().str());
    TORCH_CHECK(g.scalar_type() == torch::kFloat32, "accumulate_class_grads: gradient ", num(i),
                " must be float32, got ", c10::toString(g.scalar_type()));
    TORCH_CHECK(g.dim() >= 1 && g.size(0) == B, "accumulate_class_grads: gradient ", num(i),
                " must have a leading dimension of ", num(B), " (one row per class index)");
    const int64_t n = B ? g.numel() / B : 0;
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + n <= P, "accumulate_class_grads: gradient ", num(i),
                " (", num(n), " values at offset ", num(offsets[i]), ") does not fit a row of ",
                num(P));
  }
  return cls;
}

void accumulate_class_grads(torch::Tensor buffer, std::vector<torch::Tensor> grads,
                            std::vector<int64_t> offsets, torch::Tensor classes, double scale) {
  const auto classes_c = check_accumulate(buffer, grads, offsets, classes);
#ifdef DASM_WITH_CUDA
  if (buffer.is_cuda()) {
    accumulate_class_grads_cuda(buffer, grads, offsets, classes_c, scale);
    return;
  }
#endif
  TORCH_CHECK(buffer.is_cpu(), "accumulate_class_grads: this build supports CPU tensors only, got ",
              buffer.device().str());
  const int64_t P = buffer.size(1), B = classes_c.size(0);
  const int64_t* cls = classes_c.data_ptr<int64_t>();
  std::vector<torch::Tensor> flat;
  flat.reserve(grads.size());
  for (auto& g : grads) flat.push_back(g.contiguous());
  // Work items: column chunks of each layer. Rows j are added in order inside a chunk, so
  // repeated class indices accumulate deterministically without atomics.
  constexpr int64_t kChunk = 8192;
  struct Item { int64_t layer, begin, end; };
  std::vector<Item> items;
  for (size_t i = 0; i < flat.size(); ++i) {
    const int64_t n = B ? flat[i].numel() / B : 0;
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({(int64_t)i, b, std::min(n, b + kChunk)});
  }
  float* out = buffer.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const Item it = items[t];
      const int64_t n = flat[it.layer].numel() / B;
      const float* g = flat[it.layer].data_ptr<float>();
      const int64_t off = offsets[it.layer];
      for (int64_t j = 0; j < B; ++j) {
        float* dst = out + cls[j] * P + off;
        const float* src = g + j * n;
        for (int64_t k = it.begin; k < it.end; ++k) dst[k] += s * src[k];
      }
    }
  });
}

// ----------------------------------------------------------- instance norm + ReLU + pool
// Hot loops are written as simple simd loops over a plane held in small scratch arrays; GCC
// clones them for AVX-512 / AVX2 / baseline and picks one at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DASM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DASM_CLONES
#endif

struct Plane {
  int64_t H, W, M, Hp, Wp;  // Hp, Wp: pooled size (== H, W without pooling)
  bool pool;
};

Plane make_plane(const torch::Tensor& z, bool pool) {
  Plane p;
  p.H = z.size(2);
  p.W = z.size(3);
  p.M = p.H * p.W;
  p.pool = pool;
  p.Hp = pool ? p.H / 2 : p.H;
  p.Wp = pool ? p.W / 2 : p.W;
  return p;
}

void check_inrp(const torch::Tensor& z, const torch::Tensor& weight, const torch::Tensor& bias,
                bool pool) {
  TORCH_CHECK(z.is_cpu(), "instance_norm_relu_pool (ext): CPU tensors only, got ",
              z.device().str());
  TORCH_CHECK(z.dim() == 4, "instance_norm_relu_pool: input must be [N, C, H, W], got ",
              num(z.dim()), "-D");
  TORCH_CHECK(z.scalar_type() == torch::kFloat32, "instance_norm_relu_pool: float32 only, got ",
              c10::toString(z.scalar_type()));
  TORCH_CHECK(weight.numel() == z.size(1) && bias.numel() == z.size(1),
              "instance_norm_relu_pool: weight and bias need ", num(z.size(1)), " values");
  TORCH_CHECK(!pool || (z.size(2) >= 2 && z.size(3) >= 2),
              "instance_norm_relu_pool: pooling needs H, W >= 2");
}

// dr = pool^T(g): the upstream gradient spread over the plane (g/4 on each pixel of a full 2x2
// cell, 0 on a leftover odd row/column).
inline void spread(const float* g, const Plane& p, float* dr) {
  if (!p.pool) {
    std::copy(g, g + p.M, dr);
    return;
  }
  std::fill(dr, dr + p.M, 0.f);
  for (int64_t i = 0; i < 2 * p.Hp; ++i) {
    const float* gr = g + (i >> 1) * p.Wp;
    float* d = dr + i * p.W;
    for (int64_t j = 0; j < 2 * p.Wp; ++j) d[j] = 0.25f * gr[j >> 1];
  }
}

// out = pool(v): 2x2 average (sum of four, times 1/4), or a copy.
inline void pool_plane(const float* v, const Plane& p, float* out) {
  if (!p.pool) {
    std::copy(v, v + p.M, out);
    return;
  }
  for (int64_t i = 0; i < p.Hp; ++i) {
    const float* r0 = v + (2 * i) * p.W;
    const float* r1 = r0 + p.W;
    float* o = out + i * p.Wp;
    for (int64_t j = 0; j < p.Wp; ++j) {
      const float s = (r0[2 * j] + r0[2 * j + 1]) + (r1[2 * j] + r1[2 * j + 1]);
      o[j] = 0.25f * s;
    }
  }
}

DASM_CLONES
void plane_stats(const float* x, int64_t M, double eps, float* mu_out, float* rs_out) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < M; ++k) s += x[k];
  const float mu = s / static_cast<float>(M);
  float v = 0.f;
#pragma omp simd reduction(+ : v)
  for (int64_t k = 0; k < M; ++k) v += (x[k] - mu) * (x[k] - mu);
  *mu_out = mu;
  *rs_out = static_cast<float>(1.0 / std::sqrt(static_cast<double>(v) / M + eps));
}

DASM_CLONES
void plane_relu(const float* x, int64_t M, float mu, float rs, float gw, float gb, float* r) {
#pragma omp simd
  for (int64_t k = 0; k < M; ++k) r[k] = std::max(gw * ((x[k] - mu) * rs) + gb, 0.f);
}

// xh, dy = mask * dr, dxh = gw * dy; returns sums of dxh, dxh*xh, dy, dy*xh.
struct Sums { float A, B, dbeta, dgamma; };

DASM_CLONES
Sums plane_backward(const float* x, const float* dr, int64_t M, float mu, float rs, float gw,
                    float gb, float* xh, float* dy, float* dxh) {
  float sa = 0.f, sb = 0.f, sdb = 0.f, sdg = 0.f;
#pragma omp simd reduction(+ : sa, sb, sdb, sdg)
  for (int64_t k = 0; k < M; ++k) {
    const float xk = (x[k] - mu) * rs;
    const float d = (gw * xk + gb > 0.f) ? dr[k] : 0.f;
    xh[k] = xk;
    dy[k] = d;
    dxh[k] = gw * d;
    sa += gw * d;
    sb += gw * d * xk;
    sdb += d;
    sdg += d * xk;
  }
  const float inv = 1.f / static_cast<float>(M);
  return {sa * inv, sb * inv, sdb, sdg};
}

DASM_CLONES
void plane_gz(const float* xh, const float* dxh, int64_t M, float rs, float A, float B, float* gz) {
#pragma omp simd
  for (int64_t k = 0; k < M; ++k) gz[k] = rs * (dxh[k] - A - xh[k] * B);
}

DASM_CLONES
void plane_double(const float* u, const float* xh, const float* dy, const float* dxh, int64_t M,
                  float rs, float gw, float gb, Sums s, float* udr, float* uz, float* uw_out) {
  float su = 0.f, sux = 0.f, sud = 0.f;
#pragma omp simd reduction(+ : su, sux, sud)
  for (int64_t k = 0; k < M; ++k) {
    su += u[k];
    sux += u[k] * xh[k];
    sud += u[k] * dxh[k];
  }
  const float inv = 1.f / static_cast<float>(M);
  const float mu_u = su * inv, mu_ux = sux * inv;
  const float u_s = sud - s.A * su - s.B * sux;  // adjoint of the leading rstd of gz
  const float m_uxh = -rs * (s.B * mu_u + mu_ux * s.A);  // mean of the xh adjoint
  const float m_uxh_x = -2.f * rs * s.B * mu_ux;  // mean of (xh adjoint) * xh
  const float c_s = u_s * rs * rs * inv;
  float uw = 0.f;
#pragma omp simd reduction(+ : uw)
  for (int64_t k = 0; k < M; ++k) {
    const float u_dxh = rs * (u[k] - mu_u - xh[k] * mu_ux);
    const bool on = gw * xh[k] + gb > 0.f;
    udr[k] = on ? gw * u_dxh : 0.f;
    uw += u_dxh * dy[k];
    const float u_xh = -rs * (s.B * u[k] + mu_ux * dxh[k]);
    uz[k] = rs * (u_xh - m_uxh - xh[k] * m_uxh_x) - c_s * xh[k];
  }
  *uw_out = uw;
}

std::vector<torch::Tensor> inrp_forward(torch::Tensor z, torch::Tensor weight, torch::Tensor bias,
                                        bool pool, double eps) {
  check_inrp(z, weight, bias, pool);
  z = z.contiguous();
  auto w = weight.contiguous().to(torch::kFloat32);
  auto b = bias.contiguous().to(torch::kFloat32);
  const int64_t N = z.size(0), C = z.size(1);
  const Plane p = make_plane(z, pool);
  auto out = torch::empty({N, C, p.Hp, p.Wp}, z.options());
  auto mean = torch::empty({N, C}, z.options());
  auto rstd = torch::empty({N, C}, z.options());
  const float* zp = z.data_ptr<float>();
  float *op = out.data_ptr<float>(), *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  at::parallel_for(0, N * C, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> r(p.M);
    for (int64_t nc = lo; nc < hi; ++nc) {
      const float* x = zp + nc * p.M;
      plane_stats(x, p.M, eps, mp + nc, rp + nc);
      float* o = op + nc * p.Hp * p.Wp;
      plane_relu(x, p.M, mp[nc], rp[nc], wp[nc % C], bp[nc % C], pool ? r.data() : o);
      if (pool) pool_plane(r.data(), p, o);
    }
  });
  return {out, mean, rstd};
}

std::vector<torch::Tensor> inrp_backward(torch::Tensor g, torch::Tensor z, torch::Tensor mean,
                                         torch::Tensor rstd, torch::Tensor weight,
                                         torch::Tensor bias, bool pool) {
  check_inrp(z, weight, bias, pool);
  z = z.contiguous();
  g = g.contiguous().to(torch::kFloat32);
  auto w = weight.contiguous().to(torch::kFloat32);
  auto b = bias.contiguous().to(torch::kFloat32);
  const int64_t N = z.size(0), C = z.size(1);
  const Plane p = make_plane(z, pool);
  TORCH_CHECK(g.numel() == N * C * p.Hp * p.Wp, "inrp_backward: gradient has the wrong size");
  auto gz = torch::empty_like(z);
  auto dgamma_nc = torch::empty({N, C}, z.options());
  auto dbeta_nc = torch::empty({N, C}, z.options());
  const float *zp = z.data_ptr<float>(), *gp = g.data_ptr<float>();
  const float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float *gzp = gz.data_ptr<float>(), *dgp = dgamma_nc.data_ptr<float>(),
        *dbp = dbeta_nc.data_ptr<float>();
  at::parallel_for(0, N * C, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> dr(p.M), xh(p.M), dy(p.M), dxh(p.M);
    for (int64_t nc = lo; nc < hi; ++nc) {
      spread(gp + nc * p.Hp * p.Wp, p, dr.data());
      const Sums s = plane_backward(zp + nc * p.M, dr.data(), p.M, mp[nc], rp[nc], wp[nc % C],
                                    bp[nc % C], xh.data(), dy.data(), dxh.data());
      plane_gz(xh.data(), dxh.data(), p.M, rp[nc], s.A, s.B, gzp + nc * p.M);
      dgp[nc] = s.dgamma;
      dbp[nc] = s.dbeta;
    }
  });
  return {gz, dgamma_nc.sum(0), dbeta_nc.sum(0)};
}

// u: adjoint of gz. Returns (adjoint of g, adjoint of z, adjoint of weight).
std::vector<torch::Tensor> inrp_double_backward(torch::Tensor u, torch::Tensor g, torch::Tensor z,
                                                torch::Tensor mean, torch::Tensor rstd,
                                                torch::Tensor weight, torch::Tensor bias,
                                                bool pool) {
  check_inrp(z, weight, bias, pool);
  z = z.contiguous();
  u = u.contiguous().to(torch::kFloat32);
  g = g.contiguous().to(torch::kFloat32);
  auto w = weight.contiguous().to(torch::kFloat32);
  auto b = bias.contiguous().to(torch::kFloat32);
  const int64_t N = z.size(0), C = z.size(1);
  const Plane p = make_plane(z, pool);
  TORCH_CHECK(u.numel() == z.numel(), "inrp_double_backward: adjoint has the wrong size");
  TORCH_CHECK(g.numel() == N * C * p.Hp * p.Wp, "inrp_double_backward: gradient has the wrong size");
  auto ug = torch::empty({N, C, p.Hp, p.Wp}, z.options());
  auto uz = torch::empty_like(z);
  auto uw_nc = torch::empty({N, C}, z.options());
  const float *zp = z.data_ptr<float>(), *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  const float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float *ugp = ug.data_ptr<float>(), *uzp = uz.data_ptr<float>(), *uwp = uw_nc.data_ptr<float>();
  at::parallel_for(0, N * C, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> dr(p.M), xh(p.M), dy(p.M), dxh(p.M), udr(p.M);
    for (int64_t nc = lo; nc < hi; ++nc) {
      const float rs = rp[nc], gw = wp[nc % C], gb = bp[nc % C];
      spread(gp + nc * p.Hp * p.Wp, p, dr.data());
      const Sums s = plane_backward(zp + nc * p.M, dr.data(), p.M, mp[nc], rs, gw, gb, xh.data(),
                                    dy.data(), dxh.data());
      plane_double(up + nc * p.M, xh.data(), dy.data(), dxh.data(), p.M, rs, gw, gb, s,
                   udr.data(), uzp + nc * p.M, uwp + nc);
      pool_plane(udr.data(), p, ugp + nc * p.Hp * p.Wp);
    }
  });
  return {ug, uz, uw_nc.sum(0)};
}

bool has_cuda() {
#ifdef DASM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dasm compiled extension: accumulate_class_grads and the fused ConvNet block";
  m.def("accumulate_class_grads", &accumulate_class_grads,
        "buffer[classes[j], offsets[i]:+n_i] += scale * grads[i][j] (in place)",
        py::arg("buffer"), py::arg("grads"), py::arg("offsets"), py::arg("classes"),
        py::arg("scale"));
  m.def("inrp_forward", &inrp_forward, "instance norm + ReLU (+ avg pool) forward");
  m.def("inrp_backward", &inrp_backward, "its backward: (grad_z, grad_weight, grad_bias)");
  m.def("inrp_double_backward", &inrp_double_backward,
        "backward of the backward: (adjoint of grad_out, adjoint of z, adjoint of weight)");
  m.def("has_cuda", &has_cuda, "whether the CUDA part was compiled");
}
