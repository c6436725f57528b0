// TensorRT plugin (IPluginV3) for DMF's DCNv1 deformable convolution: the TensorRT skin
// over dmf::deform_conv2d_forward_cuda (csrc/kernels/), which knows nothing of TensorRT.
// Name "DMFDeformConv2d", version "1", namespace "": the op type, plugin_version and
// plugin_namespace of the plugin-flavour ONNX node (Python's copy of this identity:
// dmf_export/tensorrt/plugin.py), so that TensorRT's ONNX parser finds it in the plugin
// registry. Documented in README.md (this folder).
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "deform_conv_shape.h"

namespace dmf {
namespace trt {

constexpr char const* kDeformConvPluginName = "DMFDeformConv2d";
constexpr char const* kDeformConvPluginVersion = "1";
constexpr char const* kDeformConvPluginNamespace = "";

// The plugin's fields (creation-time attributes), with the op's defaults
// (dmf_export.ops.deform_conv2d): pairs are (height, width).
struct DeformConvAttributes {
  int32_t stride[2] = {1, 1};
  int32_t padding[2] = {0, 0};
  int32_t dilation[2] = {1, 1};
  int32_t groups = 1;
  int32_t offset_groups = 1;

  // nullptr when every value is allowed; otherwise which one is not (one line).
  char const* error() const;
};

// Reads `fc` into `attributes` (fields missing from `fc` keep their value). Returns false
// and sets `why` on an unknown field name, a wrong type or length, or a bad value.
bool parseDeformConvFields(nvinfer1::PluginFieldCollection const* fc, DeformConvAttributes& attributes,
                           std::string& why);

class DMFDeformConv2dPlugin final : public nvinfer1::IPluginV3,
                                    public nvinfer1::IPluginV3OneCore,
                                    public nvinfer1::IPluginV3OneBuild,
                                    public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit DMFDeformConv2dPlugin(DeformConvAttributes const& attributes);
  DMFDeformConv2dPlugin(DMFDeformConv2dPlugin const& other);
  DMFDeformConv2dPlugin& operator=(DMFDeformConv2dPlugin const&) = delete;
  ~DMFDeformConv2dPlugin() override = default;

  DeformConvAttributes const& attributes() const noexcept { return mAttributes; }

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

  // IPluginV3OneBuild
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                             nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                          nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs,
                          nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override;
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs,
                          int32_t nbOutputs) const noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

 private:
  DeformConvAttributes mAttributes;
  // Storage behind getFieldsToSerialize(): rebuilt on each call, pointing into mAttributes.
  std::vector<nvinfer1::PluginField> mSerialFields;
  nvinfer1::PluginFieldCollection mSerialCollection{};
};

class DMFDeformConv2dPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  DMFDeformConv2dPluginCreator();
  ~DMFDeformConv2dPluginCreator() override = default;

  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;

 private:
  std::vector<nvinfer1::PluginField> mFieldNames;
  nvinfer1::PluginFieldCollection mFieldCollection{};
};

// The logger TensorRT hands the library through setLoggerFinder() (nullptr before that).
void setPluginLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
// Reports through TensorRT's logger when one was handed over, else on stderr.
void logPluginMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;

}  // namespace trt
}  // namespace dmf
