// Drives the built plugin library the way TensorRT does, without TensorRT's libraries or a
// GPU: dlopen, getCreators, setLoggerFinder, createPlugin from fields, the build/runtime
// queries that need no IExprBuilder, the field round trip through getFieldsToSerialize and
// createPlugin(kRUNTIME), and the runtime shape checks. Prints "key value" lines that
// tests/test_tensorrt.py compares with values worked out by hand from the spec.
//
// Build: c++ -std=c++17 -I<TensorRT include> -I<CUDA include> trt_plugin_probe.cpp -ldl
// Run:   ./probe path/to/libdmf_trt_plugin.so
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace {

class CapturingLogger : public ILogger {
 public:
  void log(Severity severity, char const* msg) noexcept override {
    if (severity <= Severity::kWARNING) last = msg;
  }
  std::string last;
};

class Finder : public ILoggerFinder {
 public:
  ILogger* findLogger() override { return &logger; }
  CapturingLogger logger;
};

Finder gFinder;

// The last logged error, on one line, then forgotten.
std::string takeError() {
  std::string message = gFinder.logger.last;
  gFinder.logger.last.clear();
  return message.empty() ? "-" : message;
}

void printFields(char const* label, PluginFieldCollection const* fc) {
  std::printf("%s", label);
  for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    std::printf(" %s:%d:%d", f.name, static_cast<int>(f.type), f.length);
    if (f.data != nullptr && f.type == PluginFieldType::kINT32) {
      for (int32_t j = 0; j < f.length; ++j) std::printf("%s%d", j ? "," : "=", static_cast<int32_t const*>(f.data)[j]);
    }
  }
  std::printf("\n");
}

PluginTensorDesc desc(std::vector<int64_t> const& dims, DataType type = DataType::kFLOAT) {
  PluginTensorDesc d{};
  d.dims.nbDims = static_cast<int32_t>(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) d.dims.d[i] = dims[i];
  d.type = type;
  d.format = TensorFormat::kLINEAR;
  d.scale = 1.0F;
  return d;
}

DynamicPluginTensorDesc dynamic(DataType type, TensorFormat format = TensorFormat::kLINEAR) {
  DynamicPluginTensorDesc d{};
  d.desc = desc({-1, 4, 7, 9}, type);
  d.desc.format = format;
  return d;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s LIBRARY\n", argv[0]);
    return 2;
  }
  void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    std::printf("dlopen_error %s\n", dlerror());
    return 1;
  }
  using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
  using SetLoggerFinder = void (*)(ILoggerFinder*);
  auto getCreators = reinterpret_cast<GetCreators>(dlsym(library, "getCreators"));
  auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(library, "setLoggerFinder"));
  std::printf("entry_points %d %d\n", getCreators != nullptr, setLoggerFinder != nullptr);
  if (getCreators == nullptr || setLoggerFinder == nullptr) return 1;
  setLoggerFinder(&gFinder);

  int32_t nbCreators = -1;
  IPluginCreatorInterface* const* creators = getCreators(nbCreators);
  std::printf("creators %d\n", nbCreators);
  if (nbCreators < 1 || creators == nullptr) return 1;
  InterfaceInfo const creatorInfo = creators[0]->getInterfaceInfo();
  std::printf("creator_kind %s %d.%d\n", creatorInfo.kind, creatorInfo.major, creatorInfo.minor);
  auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
  std::printf("creator_id %s|%s|%s\n", creator->getPluginName(), creator->getPluginVersion(),
              creator->getPluginNamespace());
  printFields("field_names", creator->getFieldNames());

  // What TensorRT's ONNX parser hands over for the plugin node, non-default values.
  int32_t const stride[2] = {2, 1}, padding[2] = {1, 0}, dilation[2] = {1, 2}, groups = 2, offsetGroups = 2;
  char const version[] = "1";
  char const nspace[] = "";
  std::vector<PluginField> fields = {
      {"stride", stride, PluginFieldType::kINT32, 2},       {"padding", padding, PluginFieldType::kINT32, 2},
      {"dilation", dilation, PluginFieldType::kINT32, 2},   {"groups", &groups, PluginFieldType::kINT32, 1},
      {"offset_groups", &offsetGroups, PluginFieldType::kINT32, 1},
      {"plugin_version", version, PluginFieldType::kCHAR, 2}, {"plugin_namespace", nspace, PluginFieldType::kCHAR, 1}};
  PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
  IPluginV3* plugin = creator->createPlugin("dcn", &fc, TensorRTPhase::kBUILD);
  std::printf("create_build %d %s\n", plugin != nullptr, takeError().c_str());
  if (plugin == nullptr) return 1;

  auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
  auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
  auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  std::printf("capability_kinds %s %s %s\n", core->getInterfaceInfo().kind, build->getInterfaceInfo().kind,
              runtime->getInterfaceInfo().kind);
  std::printf("plugin_id %s|%s|%s\n", core->getPluginName(), core->getPluginVersion(), core->getPluginNamespace());
  std::printf("nb_outputs %d\n", build->getNbOutputs());

  // Serialised fields, then a plugin re-created from them as at engine deserialisation.
  printFields("serialized", runtime->getFieldsToSerialize());
  IPluginV3* restored = creator->createPlugin("dcn", runtime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME);
  std::printf("create_runtime %d\n", restored != nullptr);
  if (restored == nullptr) return 1;
  auto* restoredRuntime =
      static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  printFields("restored", restoredRuntime->getFieldsToSerialize());
  IPluginV3* cloned = plugin->clone();
  printFields("cloned", static_cast<IPluginV3OneRuntime*>(cloned->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                            ->getFieldsToSerialize());
  IPluginV3* attached = runtime->attachToContext(nullptr);
  std::printf("attached %d\n", attached != nullptr && attached != plugin);

  // Types and formats.
  auto combination = [&](DataType a, DataType b, DataType c, DataType out, TensorFormat format) {
    DynamicPluginTensorDesc io[4] = {dynamic(a, format), dynamic(b), dynamic(c), dynamic(out)};
    bool ok = true;
    for (int32_t pos = 0; pos < 4 && ok; ++pos) ok = build->supportsFormatCombination(pos, io, 3, 1);
    return static_cast<int>(ok);
  };
  std::printf("formats fp32=%d fp16=%d mixed=%d int32=%d chw32=%d out_mixed=%d\n",
              combination(DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, TensorFormat::kLINEAR),
              combination(DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF, TensorFormat::kLINEAR),
              combination(DataType::kFLOAT, DataType::kHALF, DataType::kFLOAT, DataType::kFLOAT, TensorFormat::kLINEAR),
              combination(DataType::kINT32, DataType::kINT32, DataType::kINT32, DataType::kINT32, TensorFormat::kLINEAR),
              combination(DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, TensorFormat::kCHW32),
              combination(DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, DataType::kHALF, TensorFormat::kLINEAR));
  DataType half3[3] = {DataType::kHALF, DataType::kHALF, DataType::kHALF};
  DataType mixed3[3] = {DataType::kHALF, DataType::kFLOAT, DataType::kHALF};
  DataType outType = DataType::kINT8;
  int32_t status = build->getOutputDataTypes(&outType, 1, half3, 3);
  std::printf("output_type_fp16 %d %d\n", status, static_cast<int>(outType));
  status = build->getOutputDataTypes(&outType, 1, mixed3, 3);
  std::printf("output_type_mixed %d %s\n", status != 0, takeError().c_str());
  DynamicPluginTensorDesc in3[3] = {dynamic(DataType::kFLOAT), dynamic(DataType::kFLOAT), dynamic(DataType::kFLOAT)};
  DynamicPluginTensorDesc out1[1] = {dynamic(DataType::kFLOAT)};
  std::printf("workspace %zu\n", build->getWorkspaceSize(in3, 3, out1, 1));
  std::printf("configure %d\n", build->configurePlugin(in3, 3, out1, 1));

  // Runtime shapes: input [2,4,7,9], weight [6,2,3,3]; the caller passes offset and output.
  auto shapeChange = [&](std::vector<int64_t> const& offset, std::vector<int64_t> const& output) {
    PluginTensorDesc in[3] = {desc({2, 4, 7, 9}), desc(offset), desc({6, 2, 3, 3})};
    PluginTensorDesc out[1] = {desc(output)};
    return runtime->onShapeChange(in, 3, out, 1);
  };
  int32_t const good = shapeChange({2, 36, 4, 5}, {2, 6, 4, 5});
  std::printf("shape_good %d %s\n", good, takeError().c_str());
  int32_t const badOffset = shapeChange({2, 18, 4, 5}, {2, 6, 4, 5});
  std::printf("shape_bad_offset %d %s\n", badOffset, takeError().c_str());
  int32_t const badOutput = shapeChange({2, 36, 4, 5}, {2, 6, 5, 5});
  std::printf("shape_bad_output %d %s\n", badOutput, takeError().c_str());
  {  // a bad shape is refused before anything reaches the GPU
    PluginTensorDesc in[3] = {desc({2, 4, 7, 9}), desc({2, 18, 4, 5}), desc({6, 2, 3, 3})};
    PluginTensorDesc out[1] = {desc({2, 6, 4, 5})};
    void const* inputs[3] = {nullptr, nullptr, nullptr};
    void* outputs[1] = {nullptr};
    int32_t const enqueued = runtime->enqueue(in, out, inputs, outputs, nullptr, nullptr);
    std::printf("enqueue_bad_shape %d %s\n", enqueued, takeError().c_str());
  }

  // Field errors: each refused with a message, none crashes.
  auto refuse = [&](char const* label, PluginField field) {
    PluginFieldCollection one{1, &field};
    IPluginV3* p = creator->createPlugin("bad", &one, TensorRTPhase::kBUILD);
    std::printf("%s %d %s\n", label, p == nullptr, takeError().c_str());
    delete p;
  };
  int32_t const zeroStride[2] = {0, 1};
  int32_t const negativePad[2] = {-1, 0};
  int32_t const zeroGroups = 0;
  float const floatStride[2] = {1.F, 1.F};
  int32_t const threeValues[3] = {1, 1, 1};
  refuse("refuse_zero_stride", {"stride", zeroStride, PluginFieldType::kINT32, 2});
  refuse("refuse_negative_padding", {"padding", negativePad, PluginFieldType::kINT32, 2});
  refuse("refuse_zero_groups", {"groups", &zeroGroups, PluginFieldType::kINT32, 1});
  refuse("refuse_float_stride", {"stride", floatStride, PluginFieldType::kFLOAT32, 2});
  refuse("refuse_three_dilation", {"dilation", threeValues, PluginFieldType::kINT32, 3});
  refuse("refuse_unknown", {"strides", stride, PluginFieldType::kINT32, 2});

  // Accepted variants: one value for both axes; INT64 as numpy gives by default; no fields.
  int32_t const one[1] = {3};
  int64_t const wide[2] = {2, 3};
  std::vector<PluginField> variants = {{"padding", one, PluginFieldType::kINT32, 1},
                                       {"dilation", wide, PluginFieldType::kINT64, 2}};
  PluginFieldCollection variantFc{2, variants.data()};
  IPluginV3* variant = creator->createPlugin("v", &variantFc, TensorRTPhase::kBUILD);
  if (variant != nullptr) {
    printFields("variant", static_cast<IPluginV3OneRuntime*>(variant->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                               ->getFieldsToSerialize());
  }
  PluginFieldCollection none{0, nullptr};
  IPluginV3* defaults = creator->createPlugin("d", &none, TensorRTPhase::kBUILD);
  if (defaults != nullptr) {
    printFields("defaults", static_cast<IPluginV3OneRuntime*>(defaults->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
                                ->getFieldsToSerialize());
  }
  delete variant;
  delete defaults;
  delete attached;
  delete cloned;
  delete restored;
  delete plugin;
  std::printf("done\n");
  return 0;
}
