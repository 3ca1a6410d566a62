// oneDNN 2-D convolutions as XLA FFI handlers: forward, backward-data (the input gradient) and
// backward-weights (the kernel gradient).
//
// Activations are NHWC, kernels HWIO ((kh, kw, in_channels / groups, out_channels)), as in
// cnnjax.layers.Conv2d. The compute type is the activations' (float32 or bfloat16; oneDNN
// accumulates bfloat16 in float32). Kernels and kernel gradients may be float32 while the
// activations are bfloat16: the reorder into oneDNN's blocked layout converts them.
//
// oneDNN chooses the kernel layout (format_tag::any): a fixed HWIO layout makes it fall back
// to slower gemm kernels for bfloat16 forward and float32 backward-weights. Each call reorders
// the HWIO kernel into that layout (or the blocked gradient back into HWIO). Primitives and
// reorders are created once per shape, dtype and attribute set, and cached; the cache is
// guarded by a mutex, and one convolution runs at a time (execute_mutex).
//
// Float32 3x3 stride-1 convolutions run as Winograd F(4x4, 3x3) instead (winograd.h, with
// oneDNN's sgemm for the products) unless the caller's "winograd" attribute is 0.
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "winograd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// oneDNN's scratchpads (scratchpad_mode::library, the default) are thread-local buffers sized
// when a primitive is created, so a primitive may only run on the thread that created it: the
// cache is keyed by thread too, and every XLA thread that runs convolutions gets its own plans.
// (scratchpad_mode::user avoids that, but oneDNN 3.2's jit_1x1 backward-weights with stride 2
// overruns a user scratchpad.)
dnnl::primitive_attr attributes() { return dnnl::primitive_attr(); }

enum class Pass { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// Everything a primitive depends on.
struct Geometry {
  int64_t n, ih, iw, ic, oh, ow, oc, kh, kw;
  int64_t sh, sw, pt, pb, pl, pr, dh, dw, groups;
  memory::data_type act, wei;  // compute type (activations), user kernel / kernel-gradient type
  bool winograd_allowed = false;  // the caller's switch; `winograd(pass)` says whether it applies

  // Whether this convolution runs as Winograd F(4x4, 3x3) (winograd.h) instead of oneDNN's
  // direct convolution: float32 3x3 stride-1 convolutions (oneDNN 3.2 has Winograd only on
  // AVX-512).
  bool winograd(Pass pass) const {
    return winograd_allowed && act == memory::data_type::f32 && wei == memory::data_type::f32 &&
           winograd::fits(kh, kw, sh, sw, dh, dw, groups, pt, pb, pl, pr, ic, oc) &&
           (pass != Pass::kBackwardWeights || winograd::kernel_gradient_fits(ic, oc));
  }

  std::string key(Pass pass) const {
    std::string k = std::to_string(static_cast<int>(pass));
    for (int64_t v : {n, ih, iw, ic, oh, ow, oc, kh, kw, sh, sw, pt, pb, pl, pr, dh, dw, groups,
                      static_cast<int64_t>(act), static_cast<int64_t>(wei)}) {
      k += ',';
      k += std::to_string(v);
    }
    return k;
  }
  memory::desc activations(int64_t h, int64_t w, int64_t c) const {
    return memory::desc({n, c, h, w}, act, memory::format_tag::nhwc);
  }
  memory::dims kernel_dims() const {
    if (groups == 1) return {oc, ic, kh, kw};
    return {groups, oc / groups, ic / groups, kh, kw};
  }
  // The kernel as cnnjax stores it: HWIO, with O = groups * (O / groups).
  memory::desc user_kernel() const {
    const int64_t icg = ic / groups;
    if (groups == 1) return memory::desc(kernel_dims(), wei, {1, oc, kw * icg * oc, icg * oc});
    return memory::desc(kernel_dims(), wei,
                        {oc / groups, 1, oc, kw * icg * oc, icg * oc});
  }
  memory::desc any_kernel(memory::data_type type) const {
    return memory::desc(kernel_dims(), type, memory::format_tag::any);
  }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims dilations() const { return {dh - 1, dw - 1}; }  // oneDNN counts extra gaps
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
  memory::desc src() const { return activations(ih, iw, ic); }
  memory::desc dst() const { return activations(oh, ow, oc); }

  dnnl::convolution_forward::primitive_desc forward_pd() const {
    return dnnl::convolution_forward::primitive_desc(
        cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
        src(), any_kernel(act), dst(), strides(), dilations(), pad_l(), pad_r(), attributes());
  }
};

// A cached primitive with the kernel reorder around it (none when the layouts already agree).
struct Plan {
  dnnl::primitive conv;
  memory::desc kernel;           // the kernel (or kernel gradient) layout the primitive uses
  memory::desc user_kernel;      // HWIO
  bool reorder = false;
  dnnl::reorder kernel_reorder;  // user -> primitive (forward, backward-data) or back
  std::string impl;
};

Plan make_plan(const Geometry& g, Pass pass) {
  Plan p;
  p.user_kernel = g.user_kernel();
  auto eng = cpu_engine();
  if (pass == Pass::kForward) {
    auto pd = g.forward_pd();
    p.conv = dnnl::convolution_forward(pd);
    p.kernel = pd.weights_desc();
    p.impl = pd.impl_info_str();
  } else if (pass == Pass::kBackwardData) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, g.src(), g.any_kernel(g.act), g.dst(),
        g.strides(), g.dilations(), g.pad_l(), g.pad_r(), g.forward_pd(), attributes());
    p.conv = dnnl::convolution_backward_data(pd);
    p.kernel = pd.weights_desc();
    p.impl = pd.impl_info_str();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, dnnl::algorithm::convolution_direct, g.src(), g.any_kernel(g.wei), g.dst(),
        g.strides(), g.dilations(), g.pad_l(), g.pad_r(), g.forward_pd(), attributes());
    p.conv = dnnl::convolution_backward_weights(pd);
    p.kernel = pd.diff_weights_desc();
    p.impl = pd.impl_info_str();
  }
  p.reorder = !(p.kernel == p.user_kernel);
  if (p.reorder) {
    auto pd = pass == Pass::kBackwardWeights
        ? dnnl::reorder::primitive_desc(eng, p.kernel, eng, p.user_kernel, attributes())
        : dnnl::reorder::primitive_desc(eng, p.user_kernel, eng, p.kernel, attributes());
    p.kernel_reorder = dnnl::reorder(pd);
  }
  return p;
}

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<const Plan>> cache;
std::string last_impl[3];

std::shared_ptr<const Plan> plan_for(const Geometry& g, Pass pass) {
  std::ostringstream thread;
  thread << std::this_thread::get_id();
  const std::string key = g.key(pass) + '@' + thread.str();
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto plan = std::make_shared<const Plan>(make_plan(g, pass));
  cache.emplace(key, plan);
  last_impl[static_cast<int>(pass)] = plan->impl;
  return plan;
}

bool to_dnnl(ffi::DataType t, memory::data_type* out) {
  if (t == ffi::DataType::F32) *out = memory::data_type::f32;
  else if (t == ffi::DataType::BF16) *out = memory::data_type::bf16;
  else return false;
  return true;
}

// Fills g from NHWC input, HWIO kernel and NHWC output shapes (whichever buffers hold them).
ffi::Error geometry(ffi::AnyBuffer::Dimensions in, ffi::AnyBuffer::Dimensions kernel, ffi::AnyBuffer::Dimensions out,
                    ffi::DataType act, ffi::DataType wei, int64_t sh, int64_t sw, int64_t pt,
                    int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw, int64_t groups,
                    Geometry* g) {
  if (in.size() != 4 || kernel.size() != 4 || out.size() != 4)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cnnjax onednn conv: rank must be 4");
  if (!to_dnnl(act, &g->act) || !to_dnnl(wei, &g->wei))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cnnjax onednn conv: dtypes must be float32 or bfloat16");
  *g = Geometry{in[0], in[1], in[2], in[3], out[1], out[2], out[3], kernel[0], kernel[1],
                sh, sw, pt, pb, pl, pr, dh, dw, groups, g->act, g->wei};
  if (groups < 1 || in[3] % groups || out[3] % groups || kernel[2] * groups != in[3] ||
      kernel[3] != out[3] || out[0] != in[0])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cnnjax onednn conv: shapes disagree");
  return ffi::Error::Success();
}

// One convolution at a time in the process: XLA runs independent ops (a block's 1x1 shortcut
// beside its 3x3 convolution, one shard per device) on different threads at once, and each
// calling thread would start its own OpenMP team over all the cores.
std::mutex execute_mutex;

thread_local std::unique_ptr<dnnl::stream> tls_stream;

dnnl::stream& stream() {
  if (!tls_stream) tls_stream = std::make_unique<dnnl::stream>(cpu_engine());
  return *tls_stream;
}

// The Winograd passes (g.winograd(pass)): forward, backward-data as the forward convolution of dy
// with the flipped kernel (padded by 2 - padding), backward-weights.
bool run_winograd(const Geometry& g, Pass pass, void* src, void* kernel, void* dst) {
  std::lock_guard<std::mutex> one_at_a_time(execute_mutex);
  const auto* x = static_cast<float*>(src);
  auto* k = static_cast<float*>(kernel);
  auto* y = static_cast<float*>(dst);
  if (pass == Pass::kForward)
    return winograd::convolve(x, g.n, g.ih, g.iw, g.ic, k, false, g.pt, g.pl, g.oh, g.ow, g.oc,
                              y);
  if (pass == Pass::kBackwardData)
    return winograd::convolve(y, g.n, g.oh, g.ow, g.oc, k, true, 2 - g.pt, 2 - g.pl, g.ih, g.iw,
                              g.ic, static_cast<float*>(src));
  return winograd::kernel_gradient(x, g.n, g.ih, g.iw, g.ic, y, g.pt, g.pl, g.oh, g.ow, g.oc, k);
}

ffi::Error run(const Geometry& g, Pass pass, void* src, void* kernel, void* dst) {
  if (g.winograd(pass)) {
    {
      std::lock_guard<std::mutex> lock(cache_mutex);
      last_impl[static_cast<int>(pass)] = winograd::kImpl;
    }
    if (run_winograd(g, pass, src, kernel, dst)) return ffi::Error::Success();
    return ffi::Error(ffi::ErrorCode::kInternal,
                      "cnnjax winograd conv: oneDNN's sgemm failed " + g.key(pass));
  }
  const char* stage = "creating the primitive";
  try {
    auto plan = plan_for(g, pass);
    stage = "executing";
    std::lock_guard<std::mutex> one_at_a_time(execute_mutex);
    auto eng = cpu_engine();
    auto& s = stream();
    memory src_m(g.src(), eng, src), dst_m(g.dst(), eng, dst);
    memory user_kernel(plan->user_kernel, eng, kernel);
    memory kernel_m = plan->reorder ? memory(plan->kernel, eng) : user_kernel;
    auto reorder_kernel = [&](memory& from, memory& to) {
      plan->kernel_reorder.execute(s, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
    };
    if (pass == Pass::kForward) {
      if (plan->reorder) reorder_kernel(user_kernel, kernel_m);
      plan->conv.execute(s, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, kernel_m},
                             {DNNL_ARG_DST, dst_m}});
    } else if (pass == Pass::kBackwardData) {
      if (plan->reorder) reorder_kernel(user_kernel, kernel_m);
      plan->conv.execute(s, {{DNNL_ARG_DIFF_SRC, src_m}, {DNNL_ARG_WEIGHTS, kernel_m},
                             {DNNL_ARG_DIFF_DST, dst_m}});
    } else {
      plan->conv.execute(s, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_DIFF_WEIGHTS, kernel_m},
                             {DNNL_ARG_DIFF_DST, dst_m}});
      if (plan->reorder) reorder_kernel(kernel_m, user_kernel);
    }
    s.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN, ") + stage + " " + g.key(pass) + ": " + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("cnnjax onednn conv: ") + e.what());
  }
  return ffi::Error::Success();
}

#define CONV_ATTRS(b)                                                                   \
  b.Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top")         \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")  \
      .Attr<int64_t>("dilation_h").Attr<int64_t>("dilation_w").Attr<int64_t>("groups")    \
      .Attr<int64_t>("winograd")

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                   int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                   int64_t dh, int64_t dw, int64_t groups, int64_t winograd) {
  Geometry g;
  auto err = geometry(x.dimensions(), w.dimensions(), y->dimensions(), x.element_type(),
                      w.element_type(), sh, sw, pt, pb, pl, pr, dh, dw, groups, &g);
  g.winograd_allowed = winograd != 0;
  if (!err.success()) return err;
  return run(g, Pass::kForward, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

// The gradients, each its own call: XLA drops one that nobody uses (the first layer's input
// gradient).
ffi::Error BackwardData(ffi::AnyBuffer w, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx,
                        int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                        int64_t dh, int64_t dw, int64_t groups, int64_t winograd) {
  Geometry g;
  auto err = geometry(dx->dimensions(), w.dimensions(), dy.dimensions(), dx->element_type(),
                      w.element_type(), sh, sw, pt, pb, pl, pr, dh, dw, groups, &g);
  g.winograd_allowed = winograd != 0;
  if (!err.success()) return err;
  if (dy.element_type() != dx->element_type())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cnnjax onednn conv: dy and dx dtypes must match");
  return run(g, Pass::kBackwardData, dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw_,
                           int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                           int64_t pr, int64_t dh, int64_t dw, int64_t groups,
                           int64_t winograd) {
  Geometry g;
  auto err = geometry(x.dimensions(), dw_->dimensions(), dy.dimensions(), x.element_type(),
                      dw_->element_type(), sh, sw, pt, pb, pl, pr, dh, dw, groups, &g);
  g.winograd_allowed = winograd != 0;
  if (!err.success()) return err;
  if (dy.element_type() != x.element_type())
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cnnjax onednn conv: x and dy dtypes must match");
  return run(g, Pass::kBackwardWeights, x.untyped_data(), dw_->untyped_data(),
             dy.untyped_data());
}

}  // namespace

// The library is built with -fvisibility=hidden: only these symbols are exported.
#define CNNJAX_EXPORT extern "C" __attribute__((visibility("default")))
CNNJAX_EXPORT XLA_FFI_Error* cnnjax_conv_forward(XLA_FFI_CallFrame* call_frame);
CNNJAX_EXPORT XLA_FFI_Error* cnnjax_conv_backward_data(XLA_FFI_CallFrame* call_frame);
CNNJAX_EXPORT XLA_FFI_Error* cnnjax_conv_backward_weights(XLA_FFI_CallFrame* call_frame);
CNNJAX_EXPORT const char* cnnjax_conv_last_impl(int pass);
CNNJAX_EXPORT int cnnjax_conv_bf16_native();
CNNJAX_EXPORT int cnnjax_conv_abi();

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    cnnjax_conv_forward, Forward,
    CONV_ATTRS(ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                   .Ret<ffi::AnyBuffer>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    cnnjax_conv_backward_data, BackwardData,
    CONV_ATTRS(ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                   .Ret<ffi::AnyBuffer>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    cnnjax_conv_backward_weights, BackwardWeights,
    CONV_ATTRS(ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                   .Ret<ffi::AnyBuffer>()));

// The handlers' calling convention (operands and attributes): cnnjax.kernels.loader refuses a
// library built for another one ("out of date: rebuild it"). 2: the "winograd" attribute.
int cnnjax_conv_abi() { return 2; }

// For cnnjax.kernels.backend(): the oneDNN implementation most recently chosen for each pass
// (0 forward, 1 backward-data, 2 backward-weights), e.g. "brg_conv_fwd:avx512_core".
const char* cnnjax_conv_last_impl(int pass) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  static thread_local std::string copy;
  copy = (pass >= 0 && pass < 3) ? last_impl[pass] : std::string();
  return copy.c_str();
}

// 1 when oneDNN has bfloat16 convolutions on this CPU (all three passes of a 3x3 convolution),
// 0 when it has not (e.g. AVX2 without AVX512-BF16 or AVX-VNNI-2): cnnjax then computes
// bfloat16 convolutions in float32.
int cnnjax_conv_bf16_native() {
  Geometry g{8, 8, 8, 32, 8, 8, 32, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1,
             memory::data_type::bf16, memory::data_type::f32};
  try {
    for (Pass pass : {Pass::kForward, Pass::kBackwardData, Pass::kBackwardWeights})
      make_plan(g, pass);
  } catch (const dnnl::error&) {
    return 0;
  }
  return 1;
}
