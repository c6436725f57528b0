// The library's only exported symbols: the entry points that IPluginRegistry::loadLibrary
// (Python: tensorrt.get_plugin_registry().load_library) and `trtexec --dynamicPlugins`
// look for in a plugin shared library. Everything else is built with hidden visibility.
#include "DMFDeformConv2dPlugin/DMFDeformConv2dPlugin.h"

#if defined(_WIN32)
#define DMF_PLUGIN_EXPORT __declspec(dllexport)
#else
#define DMF_PLUGIN_EXPORT __attribute__((visibility("default")))
#endif

// The creators this library contains (one). TensorRT does not take ownership.
extern "C" DMF_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static dmf::trt::DMFDeformConv2dPluginCreator deformConvCreator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&deformConvCreator};
  nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
  return creators;
}

// TensorRT hands the library a way to reach the logger of the engine or context that is
// calling it; the plugin logs its errors there.
extern "C" DMF_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  dmf::trt::setPluginLoggerFinder(finder);
}
