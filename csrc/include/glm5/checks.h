// Input checks shared by every host wrapper (CPU and CUDA): each names the argument it rejects,
// so a bad call raises a Python error that says what is wrong, never crashes the process.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cstdint>
#include <limits>
#include <optional>

#define GLM5_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)

#define GLM5_CHECK_NDIM(x, n) \
  TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dimensions, got ", (x).dim(), " (shape ", (x).sizes(), ")")

#define GLM5_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must be ", c10::toString(dt), ", got ", (x).scalar_type())

#define GLM5_CHECK_FLOAT(x)                                                                            \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||              \
                  (x).scalar_type() == at::kHalf || (x).scalar_type() == at::kDouble,                \
              #x " must be float32, bfloat16, float16 or float64, got ", (x).scalar_type())

#define GLM5_CHECK_SAME_DTYPE(x, y) \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " and " #y " must have the same dtype, got ", \
              (x).scalar_type(), " and ", (y).scalar_type())

#define GLM5_CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " is on ", (x).device(), " but " #y " is on ", (y).device())

#define GLM5_CHECK_DEVICE_TYPE(x, t) \
  TORCH_CHECK((x).device().type() == (t), #x " must be a ", c10::DeviceTypeName(t), " tensor, got ", (x).device())

#define GLM5_CHECK_SIZE(x, d, n) \
  TORCH_CHECK((x).size(d) == (n), #x ".size(", (d), ") must be ", (n), ", got ", (x).size(d), " (shape ", (x).sizes(), ")")

#define GLM5_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")

// Checks that apply to an optional tensor only when it is present.
#define GLM5_CHECK_OPT(opt, CHECK, ...) \
  do {                                   \
    if ((opt).has_value()) {             \
      const at::Tensor& opt##_v = *(opt); \
      CHECK(opt##_v, __VA_ARGS__);       \
    }                                    \
  } while (0)

namespace glm5 {

// Narrow a size or stride to int32 for kernels that index with 32-bit ints, with a clear error.
inline int32_t checked_int32(int64_t v, const char* what) {
  TORCH_CHECK(v >= std::numeric_limits<int32_t>::min() && v <= std::numeric_limits<int32_t>::max(),
              what, " = ", v, " does not fit in int32");
  return static_cast<int32_t>(v);
}

}  // namespace glm5
