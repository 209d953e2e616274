// accumulate_class_grads on CUDA: one launch for all gradient tensors (multi-tensor-apply style).
//
// The host builds a table of (tensor, column chunk) work items followed by the B class indices
// (checked on the host by the caller) and uploads it in one copy; each block takes one item and
// each thread one column, adding the B rows in order: repeated class indices accumulate
// deterministically and without atomics.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>

#include <vector>

namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 4 * kThreads;  // columns per work item

struct Item {
  const float* src;  // [B, n] row-major gradient
  int64_t n;         // values per row
  int64_t offset;    // destination offset in a buffer row
  int64_t begin;     // first column of this chunk
};

__global__ void accumulate_kernel(float* __restrict__ buffer, int64_t P,
                                  const Item* __restrict__ items,
                                  const int64_t* __restrict__ classes, int64_t B, float scale) {
  const Item it = items[blockIdx.x];
  for (int64_t col = it.begin + threadIdx.x; col < it.begin + kChunk && col < it.n;
       col += blockDim.x) {
    for (int64_t j = 0; j < B; ++j) {
      buffer[classes[j] * P + it.offset + col] += scale * it.src[j * it.n + col];
    }
  }
}

}  // namespace

void accumulate_class_grads_cuda(torch::Tensor buffer, const std::vector<torch::Tensor>& grads,
                                 const std::vector<int64_t>& offsets, torch::Tensor classes,
                                 double scale) {
  // classes: contiguous int64 host rows, range-checked by the caller (check_accumulate)
  c10::cuda::CUDAGuard guard(buffer.device());
  const int64_t B = classes.size(0);
  if (B == 0 || grads.empty()) return;
  std::vector<torch::Tensor> flat;
  std::vector<Item> items;
  for (size_t i = 0; i < grads.size(); ++i) {
    flat.push_back(grads[i].contiguous());
    const int64_t n = flat.back().numel() / B;
    for (int64_t b = 0; b < n; b += kChunk)
      items.push_back({flat.back().data_ptr<float>(), n, offsets[i], b});
  }
  if (items.empty()) return;
  // [items | classes] in one pinned buffer, one upload (sizeof(Item) keeps int64 alignment)
  const size_t item_bytes = items.size() * sizeof(Item), class_bytes = B * sizeof(int64_t);
  auto table = torch::empty({static_cast<int64_t>(item_bytes + class_bytes)},
                            torch::dtype(torch::kUInt8).pinned_memory(true));
  std::memcpy(table.data_ptr(), items.data(), item_bytes);
  std::memcpy(static_cast<uint8_t*>(table.data_ptr()) + item_bytes,
              classes.data_ptr<int64_t>(), class_bytes);
  auto dev_table = table.to(buffer.device(), /*non_blocking=*/true);
  const auto* dev = static_cast<const uint8_t*>(dev_table.data_ptr());
  auto stream = c10::cuda::getCurrentCUDAStream();
  accumulate_kernel<<<static_cast<unsigned>(items.size()), kThreads, 0, stream>>>(
      buffer.data_ptr<float>(), buffer.size(1), reinterpret_cast<const Item*>(dev),
      reinterpret_cast<const int64_t*>(dev + item_bytes), B, static_cast<float>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // keep the flattened inputs and the table alive until the kernel has read them
  for (auto& f : flat) f.record_stream(stream);
  dev_table.record_stream(stream);
}
