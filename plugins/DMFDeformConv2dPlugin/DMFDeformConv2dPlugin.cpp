// The IPluginV3 skin over dmf::deform_conv2d_forward_cuda. See DMFDeformConv2dPlugin.h and
// README.md (the operator's documentation).
#include "DMFDeformConv2dPlugin.h"

#include <atomic>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <sstream>

#include "deform_conv_cuda.h"

namespace dmf {
namespace trt {

using nvinfer1::DataType;
using nvinfer1::DimensionOperation;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::IDimensionExpr;
using nvinfer1::IExprBuilder;
using nvinfer1::ILogger;
using nvinfer1::IPluginCapability;
using nvinfer1::IPluginV3;
using nvinfer1::PluginCapabilityType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;

namespace {

constexpr int32_t kNbInputs = 3;  // input, offset, weight
constexpr int32_t kNbOutputs = 1;
constexpr int32_t kInput = 0;
constexpr int32_t kOffset = 1;
constexpr int32_t kWeight = 2;

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

void logError(std::string const& message) noexcept {
  logPluginMessage(ILogger::Severity::kERROR, message);
}

bool isFloatingType(DataType type) { return type == DataType::kFLOAT || type == DataType::kHALF; }

// Integer plugin fields: INT32 is what TensorRT's ONNX parser passes for INT/INTS
// attributes and what getFieldsToSerialize writes; INT8/16/64 are accepted for callers
// that build the collection by hand (e.g. from Python with numpy int64 arrays).
bool readIntegers(PluginField const& field, std::vector<int64_t>& values, std::string& why) {
  values.clear();
  if (field.length < 0 || (field.length > 0 && field.data == nullptr)) {
    why = std::string("field '") + field.name + "' has no data";
    return false;
  }
  for (int32_t i = 0; i < field.length; ++i) {
    switch (field.type) {
      case PluginFieldType::kINT32: values.push_back(static_cast<int32_t const*>(field.data)[i]); break;
      case PluginFieldType::kINT64: values.push_back(static_cast<int64_t const*>(field.data)[i]); break;
      case PluginFieldType::kINT16: values.push_back(static_cast<int16_t const*>(field.data)[i]); break;
      case PluginFieldType::kINT8: values.push_back(static_cast<int8_t const*>(field.data)[i]); break;
      default:
        why = std::string("field '") + field.name + "' must be INT32";
        return false;
    }
    if (values.back() < std::numeric_limits<int32_t>::min() || values.back() > std::numeric_limits<int32_t>::max()) {
      why = std::string("field '") + field.name + "' does not fit in INT32";
      return false;
    }
  }
  return true;
}

// A pair field takes 2 values (height, width), or 1 used for both, as in PyTorch.
bool readPair(PluginField const& field, int32_t (&pair)[2], std::string& why) {
  std::vector<int64_t> values;
  if (!readIntegers(field, values, why)) return false;
  if (values.size() != 1 && values.size() != 2) {
    why = std::string("field '") + field.name + "' needs 2 values (height, width)";
    return false;
  }
  pair[0] = static_cast<int32_t>(values[0]);
  pair[1] = static_cast<int32_t>(values.back());
  return true;
}

bool readScalar(PluginField const& field, int32_t& value, std::string& why) {
  std::vector<int64_t> values;
  if (!readIntegers(field, values, why)) return false;
  if (values.size() != 1) {
    why = std::string("field '") + field.name + "' needs exactly 1 value";
    return false;
  }
  value = static_cast<int32_t>(values[0]);
  return true;
}

// The runtime shape of one call, from the tensors' dims and the plugin's fields. Checks
// what the launcher cannot see: that offset and output have the sizes the input, weight
// and fields imply.
bool runtimeShape(PluginTensorDesc const* in, PluginTensorDesc const* out, DeformConvAttributes const& a,
                  DeformConvShape& s, std::string& why) {
  for (int32_t i = 0; i < kNbInputs; ++i) {
    if (in[i].dims.nbDims != 4) {
      why = "input, offset and weight must be 4-D (NCHW)";
      return false;
    }
  }
  auto const& x = in[kInput].dims;
  auto const& w = in[kWeight].dims;
  s = DeformConvShape{};
  s.batch = x.d[0];
  s.channels = x.d[1];
  s.height = x.d[2];
  s.width = x.d[3];
  s.out_channels = w.d[0];
  s.kernel_h = w.d[2];
  s.kernel_w = w.d[3];
  s.stride_h = a.stride[0];
  s.stride_w = a.stride[1];
  s.pad_h = a.padding[0];
  s.pad_w = a.padding[1];
  s.dilation_h = a.dilation[0];
  s.dilation_w = a.dilation[1];
  s.groups = a.groups;
  s.offset_groups = a.offset_groups;
  complete_output_size(s);
  if (char const* problem = deform_conv_shape_error(s)) {
    why = problem;
    return false;
  }
  std::ostringstream msg;
  if (w.d[1] * s.groups != s.channels) {
    msg << "weight [" << w.d[0] << ", " << w.d[1] << ", " << w.d[2] << ", " << w.d[3] << "] does not fit "
        << s.channels << " input channels in " << s.groups << " groups";
  }
  auto const& o = in[kOffset].dims;
  if (msg.tellp() == 0 && (o.d[0] != s.batch || o.d[1] != s.offset_channels() || o.d[2] != s.out_h ||
                           o.d[3] != s.out_w)) {
    msg << "offset is [" << o.d[0] << ", " << o.d[1] << ", " << o.d[2] << ", " << o.d[3] << "], expected ["
        << s.batch << ", " << s.offset_channels() << ", " << s.out_h << ", " << s.out_w << "]";
  }
  if (msg.tellp() == 0 && out != nullptr) {
    auto const& y = out[0].dims;
    if (y.nbDims != 4 || y.d[0] != s.batch || y.d[1] != s.out_channels || y.d[2] != s.out_h ||
        y.d[3] != s.out_w) {
      msg << "output must be [" << s.batch << ", " << s.out_channels << ", " << s.out_h << ", " << s.out_w << "]";
    }
  }
  if (msg.tellp() != 0) {
    why = msg.str();
    return false;
  }
  return true;
}

// (in + 2·pad − (dilation·(kernel − 1) + 1)) floor-div stride + 1, the convolution formula
// (conv_output_size), as a dimension expression; folded when kernel is a build-time constant.
IDimensionExpr const* outputSizeExpr(IExprBuilder& b, IDimensionExpr const* in, IDimensionExpr const* kernel,
                                     int32_t stride, int32_t pad, int32_t dilation) {
  if (in == nullptr || kernel == nullptr) return nullptr;
  IDimensionExpr const* reach = nullptr;  // in + 2·pad − dilated kernel extent
  if (kernel->isConstant()) {
    int64_t const span = int64_t(dilation) * (kernel->getConstantValue() - 1) + 1;
    int64_t const shift = 2 * int64_t(pad) - span;
    reach = shift >= 0 ? b.operation(DimensionOperation::kSUM, *in, *b.constant(shift))
                       : b.operation(DimensionOperation::kSUB, *in, *b.constant(-shift));
  } else {
    IDimensionExpr const* taps = b.operation(DimensionOperation::kSUB, *kernel, *b.constant(1));
    if (taps == nullptr) return nullptr;
    IDimensionExpr const* span = b.operation(DimensionOperation::kSUM,
                                             *b.operation(DimensionOperation::kPROD, *b.constant(dilation), *taps),
                                             *b.constant(1));
    IDimensionExpr const* padded = b.operation(DimensionOperation::kSUM, *in, *b.constant(2 * int64_t(pad)));
    if (span == nullptr || padded == nullptr) return nullptr;
    reach = b.operation(DimensionOperation::kSUB, *padded, *span);
  }
  if (reach == nullptr) return nullptr;
  IDimensionExpr const* steps = b.operation(DimensionOperation::kFLOOR_DIV, *reach, *b.constant(stride));
  if (steps == nullptr) return nullptr;
  return b.operation(DimensionOperation::kSUM, *steps, *b.constant(1));
}

}  // namespace

// ---------------------------------------------------------------- fields

char const* DeformConvAttributes::error() const {
  if (stride[0] < 1 || stride[1] < 1) return "stride must be >= 1";
  if (padding[0] < 0 || padding[1] < 0) return "padding must be >= 0";
  if (dilation[0] < 1 || dilation[1] < 1) return "dilation must be >= 1";
  if (groups < 1) return "groups must be >= 1";
  if (offset_groups < 1) return "offset_groups must be >= 1";
  return nullptr;
}

bool parseDeformConvFields(PluginFieldCollection const* fc, DeformConvAttributes& a, std::string& why) {
  if (fc == nullptr) return true;  // every field at its default
  if (fc->nbFields > 0 && fc->fields == nullptr) {
    why = "the field collection has no fields array";
    return false;
  }
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    PluginField const& field = fc->fields[i];
    if (field.name == nullptr) {
      why = "a field has no name";
      return false;
    }
    std::string const name = field.name;
    bool ok = true;
    if (name == "stride") {
      ok = readPair(field, a.stride, why);
    } else if (name == "padding") {
      ok = readPair(field, a.padding, why);
    } else if (name == "dilation") {
      ok = readPair(field, a.dilation, why);
    } else if (name == "groups") {
      ok = readScalar(field, a.groups, why);
    } else if (name == "offset_groups") {
      ok = readScalar(field, a.offset_groups, why);
    } else if (name == "plugin_version" || name == "plugin_namespace") {
      // the ONNX node's lookup keys; the registry already matched them
    } else {
      why = "unknown field '" + name + "' (expected stride, padding, dilation, groups, offset_groups)";
      return false;
    }
    if (!ok) return false;
  }
  if (char const* problem = a.error()) {
    why = problem;
    return false;
  }
  return true;
}

// ---------------------------------------------------------------- logging

void setPluginLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept { gLoggerFinder.store(finder); }

void logPluginMessage(ILogger::Severity severity, std::string const& message) noexcept {
  try {
    std::string const text = std::string(kDeformConvPluginName) + " plugin: " + message;
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
    if (logger != nullptr) {
      logger->log(severity, text.c_str());
    } else if (severity <= ILogger::Severity::kWARNING) {
      std::fprintf(stderr, "%s\n", text.c_str());
    }
  } catch (...) {
  }
}

// ---------------------------------------------------------------- plugin

DMFDeformConv2dPlugin::DMFDeformConv2dPlugin(DeformConvAttributes const& attributes) : mAttributes(attributes) {}

// Copies the fields only: the serialisation storage points into each object's own fields.
DMFDeformConv2dPlugin::DMFDeformConv2dPlugin(DMFDeformConv2dPlugin const& other)
    : IPluginV3(other),
      IPluginV3OneCore(other),
      IPluginV3OneBuild(other),
      IPluginV3OneRuntime(other),
      mAttributes(other.mAttributes) {}

IPluginCapability* DMFDeformConv2dPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
  switch (type) {
    case PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

IPluginV3* DMFDeformConv2dPlugin::clone() noexcept {
  try {
    return new DMFDeformConv2dPlugin(*this);
  } catch (std::exception const& e) {
    logError(std::string("clone failed: ") + e.what());
  }
  return nullptr;
}

char const* DMFDeformConv2dPlugin::getPluginName() const noexcept { return kDeformConvPluginName; }
char const* DMFDeformConv2dPlugin::getPluginVersion() const noexcept { return kDeformConvPluginVersion; }
char const* DMFDeformConv2dPlugin::getPluginNamespace() const noexcept { return kDeformConvPluginNamespace; }

int32_t DMFDeformConv2dPlugin::getNbOutputs() const noexcept { return kNbOutputs; }

int32_t DMFDeformConv2dPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                               DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept {
  if (in == nullptr || out == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs) {
    logError("expects 3 inputs (input, offset, weight) and 1 output");
    return 1;
  }
  for (int32_t i = 0; i < kNbInputs; ++i) {
    if (in[i].desc.dims.nbDims != 4) {
      logError("input, offset and weight must be 4-D (NCHW)");
      return 1;
    }
  }
  return 0;
}

int32_t DMFDeformConv2dPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs,
                                                  DataType const* inputTypes, int32_t nbInputs) const noexcept {
  if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != kNbOutputs || nbInputs != kNbInputs) {
    logError("expects 3 inputs (input, offset, weight) and 1 output");
    return 1;
  }
  for (int32_t i = 0; i < kNbInputs; ++i) {
    if (!isFloatingType(inputTypes[i]) || inputTypes[i] != inputTypes[kInput]) {
      logError("input, offset and weight must all be float32, or all float16");
      return 1;
    }
  }
  outputTypes[0] = inputTypes[kInput];
  return 0;
}

int32_t DMFDeformConv2dPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
                                               DimsExprs const* /*shapeInputs*/, int32_t nbShapeInputs,
                                               DimsExprs* outputs, int32_t nbOutputs,
                                               IExprBuilder& exprBuilder) noexcept {
  if (inputs == nullptr || outputs == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs ||
      nbShapeInputs != 0) {
    logError("expects 3 inputs (input, offset, weight), no shape inputs, and 1 output");
    return 1;
  }
  for (int32_t i = 0; i < kNbInputs; ++i) {
    if (inputs[i].nbDims != 4) {
      logError("input, offset and weight must be 4-D (NCHW)");
      return 1;
    }
  }
  DimsExprs const& x = inputs[kInput];
  DimsExprs const& offset = inputs[kOffset];
  DimsExprs const& w = inputs[kWeight];
  // Catch a mismatched graph at build time where the sizes are constants (they are for
  // channels and kernel in DMF's graph); the runtime check in onShapeChange covers the rest.
  if (x.d[1]->isConstant() && w.d[1]->isConstant() &&
      x.d[1]->getConstantValue() != w.d[1]->getConstantValue() * mAttributes.groups) {
    std::ostringstream msg;
    msg << "weight has " << w.d[1]->getConstantValue() << " channels per group, but the input's "
        << x.d[1]->getConstantValue() << " channels in " << mAttributes.groups << " groups need "
        << x.d[1]->getConstantValue() / mAttributes.groups;
    logError(msg.str());
    return 1;
  }
  if (offset.d[1]->isConstant() && w.d[2]->isConstant() && w.d[3]->isConstant()) {
    int64_t const expected =
        2 * int64_t(mAttributes.offset_groups) * w.d[2]->getConstantValue() * w.d[3]->getConstantValue();
    if (offset.d[1]->getConstantValue() != expected) {
      std::ostringstream msg;
      msg << "offset has " << offset.d[1]->getConstantValue() << " channels, expected 2*offset_groups*kh*kw = "
          << expected;
      logError(msg.str());
      return 1;
    }
  }
  DimsExprs& y = outputs[0];
  y.nbDims = 4;
  y.d[0] = x.d[0];  // batch (dynamic)
  y.d[1] = w.d[0];  // output channels
  y.d[2] = outputSizeExpr(exprBuilder, x.d[2], w.d[2], mAttributes.stride[0], mAttributes.padding[0],
                          mAttributes.dilation[0]);
  y.d[3] = outputSizeExpr(exprBuilder, x.d[3], w.d[3], mAttributes.stride[1], mAttributes.padding[1],
                          mAttributes.dilation[1]);
  if (y.d[2] == nullptr || y.d[3] == nullptr) {
    logError("could not build the output size expressions");
    return 1;
  }
  return 0;
}

bool DMFDeformConv2dPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut,
                                                      int32_t nbInputs, int32_t nbOutputs) noexcept {
  if (inOut == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 ||
      pos >= kNbInputs + kNbOutputs) {
    return false;
  }
  nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
  if (desc.format != TensorFormat::kLINEAR) return false;
  // the first tensor picks float32 or float16; every other one (the output too) follows it
  return pos == 0 ? isFloatingType(desc.type) : desc.type == inOut[0].desc.type;
}

// The launcher is a fused implicit GEMM with no column buffer: it needs no workspace.
size_t DMFDeformConv2dPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
                                               DynamicPluginTensorDesc const* /*outputs*/,
                                               int32_t /*nbOutputs*/) const noexcept {
  return 0;
}

int32_t DMFDeformConv2dPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs,
                                             PluginTensorDesc const* out, int32_t nbOutputs) noexcept {
  try {
    if (in == nullptr || out == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs) {
      logError("expects 3 inputs (input, offset, weight) and 1 output");
      return 1;
    }
    DeformConvShape shape;
    std::string why;
    if (!runtimeShape(in, out, mAttributes, shape, why)) {
      logError(why);
      return 1;
    }
    return 0;
  } catch (std::exception const& e) {
    logError(e.what());
  }
  return 1;
}

int32_t DMFDeformConv2dPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                                       void const* const* inputs, void* const* outputs, void* /*workspace*/,
                                       cudaStream_t stream) noexcept {
  try {
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr) return 1;
    DeformConvShape shape;
    std::string why;
    if (!runtimeShape(inputDesc, outputDesc, mAttributes, shape, why)) {
      logError(why);
      return 1;
    }
    cudaError_t status = cudaErrorInvalidValue;
    switch (inputDesc[kInput].type) {
      case DataType::kFLOAT:
        status = deform_conv2d_forward_cuda(stream, static_cast<float const*>(inputs[kInput]),
                                            static_cast<float const*>(inputs[kOffset]),
                                            static_cast<float const*>(inputs[kWeight]),
                                            static_cast<float*>(outputs[0]), shape);
        break;
      case DataType::kHALF:
        status = deform_conv2d_forward_cuda(stream, static_cast<__half const*>(inputs[kInput]),
                                            static_cast<__half const*>(inputs[kOffset]),
                                            static_cast<__half const*>(inputs[kWeight]),
                                            static_cast<__half*>(outputs[0]), shape);
        break;
      default:
        logError("only float32 and float16 tensors are supported");
        return 1;
    }
    if (status != cudaSuccess) {
      logError(std::string("kernel launch failed: ") + cudaGetErrorString(status));
      return 1;
    }
    return 0;
  } catch (std::exception const& e) {
    logError(e.what());
  }
  return 1;
}

IPluginV3* DMFDeformConv2dPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept {
  return clone();  // no per-context resources
}

PluginFieldCollection const* DMFDeformConv2dPlugin::getFieldsToSerialize() noexcept {
  try {
    mSerialFields.clear();
    mSerialFields.emplace_back("stride", mAttributes.stride, PluginFieldType::kINT32, 2);
    mSerialFields.emplace_back("padding", mAttributes.padding, PluginFieldType::kINT32, 2);
    mSerialFields.emplace_back("dilation", mAttributes.dilation, PluginFieldType::kINT32, 2);
    mSerialFields.emplace_back("groups", &mAttributes.groups, PluginFieldType::kINT32, 1);
    mSerialFields.emplace_back("offset_groups", &mAttributes.offset_groups, PluginFieldType::kINT32, 1);
    mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
    mSerialCollection.fields = mSerialFields.data();
    return &mSerialCollection;
  } catch (std::exception const& e) {
    logError(std::string("getFieldsToSerialize failed: ") + e.what());
  }
  return nullptr;
}

// ---------------------------------------------------------------- creator

DMFDeformConv2dPluginCreator::DMFDeformConv2dPluginCreator() {
  // What TensorRT's ONNX parser reads from the node's attributes (INTS / INT → INT32).
  mFieldNames.emplace_back("stride", nullptr, PluginFieldType::kINT32, 2);
  mFieldNames.emplace_back("padding", nullptr, PluginFieldType::kINT32, 2);
  mFieldNames.emplace_back("dilation", nullptr, PluginFieldType::kINT32, 2);
  mFieldNames.emplace_back("groups", nullptr, PluginFieldType::kINT32, 1);
  mFieldNames.emplace_back("offset_groups", nullptr, PluginFieldType::kINT32, 1);
  mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
  mFieldCollection.fields = mFieldNames.data();
}

char const* DMFDeformConv2dPluginCreator::getPluginName() const noexcept { return kDeformConvPluginName; }
char const* DMFDeformConv2dPluginCreator::getPluginVersion() const noexcept { return kDeformConvPluginVersion; }
char const* DMFDeformConv2dPluginCreator::getPluginNamespace() const noexcept {
  return kDeformConvPluginNamespace;
}

PluginFieldCollection const* DMFDeformConv2dPluginCreator::getFieldNames() noexcept { return &mFieldCollection; }

IPluginV3* DMFDeformConv2dPluginCreator::createPlugin(char const* name, PluginFieldCollection const* fc,
                                                      nvinfer1::TensorRTPhase /*phase*/) noexcept {
  try {
    DeformConvAttributes attributes;
    std::string why;
    if (!parseDeformConvFields(fc, attributes, why)) {
      logError(std::string("cannot create '") + (name != nullptr ? name : "") + "': " + why);
      return nullptr;
    }
    return new DMFDeformConv2dPlugin(attributes);
  } catch (std::exception const& e) {
    logError(std::string("createPlugin failed: ") + e.what());
  }
  return nullptr;
}

}  // namespace trt
}  // namespace dmf
