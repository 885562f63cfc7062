// Backward of the grouped straight-through + commitment node in one pass:
//   dz[b, s, :] = dq[b, s, :] + coef[s] * (z[b, s, :] - q[b, s, :])
// (the torch version is a subtraction into a temporary and an addcmul: two passes and a
// (B, S, d) temporary). Registered as torch.ops.vq_torchrec.commit_grad.
//   dq, z, q: (B, S, d) fp32 CPU (any strides; copied to contiguous when needed)
//   coef: (S,) fp32; out: (B, S, d) contiguous fp32, receives dz (the caller recycles it).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

void commit_grad(const at::Tensor& dq, const at::Tensor& z, const at::Tensor& q, const at::Tensor& coef,
                 const at::Tensor& out) {
  TORCH_CHECK(dq.dim() == 3 && z.sizes() == dq.sizes() && q.sizes() == dq.sizes(),
              "commit_grad: dq, z, q must all be (B, S, d)");
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == dq.size(1), "commit_grad: coef must be (S,)");
  TORCH_CHECK(dq.scalar_type() == at::kFloat && z.scalar_type() == at::kFloat && q.scalar_type() == at::kFloat &&
                  coef.scalar_type() == at::kFloat,
              "commit_grad: fp32 tensors");
  TORCH_CHECK(dq.device().is_cpu() && z.device().is_cpu() && q.device().is_cpu() && coef.device().is_cpu(),
              "commit_grad: CPU tensors");
  auto g = dq.contiguous();
  auto zc = z.contiguous();
  auto qc = q.contiguous();
  auto cc = coef.contiguous();
  TORCH_CHECK(out.sizes() == dq.sizes() && out.is_contiguous() && out.scalar_type() == at::kFloat &&
                  out.device().is_cpu(),
              "commit_grad: out must be a contiguous fp32 CPU (B, S, d) tensor");
  const int64_t rows = g.size(0) * g.size(1), s = g.size(1), d = g.size(2);
  const float* gp = g.data_ptr<float>();
  const float* zp = zc.data_ptr<float>();
  const float* qp = qc.data_ptr<float>();
  const float* cp = cc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float c = cp[r % s];
      const int64_t o = r * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) op[o + i] = gp[o + i] + c * (zp[o + i] - qp[o + i]);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vq_torchrec, m) {
  m.def("commit_grad(Tensor dq, Tensor z, Tensor q, Tensor coef, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(vq_torchrec, CPU, m) {
  m.impl("commit_grad", commit_grad);
}
