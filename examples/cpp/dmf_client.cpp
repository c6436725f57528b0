// A libtorch client for dmf-export artifacts: TorchScript (.ts) or AOTInductor (.pt2).
//
//   dmf_client OP_LIBRARY ARTIFACT EPISODE_DIR [SCORES_FILE]
//
// OP_LIBRARY is what `dmf-export op-library` prints: the library that defines the
// dmf::deform_conv2d op the artifacts call. EPISODE_DIR holds support.pt,
// support_labels.pt and query.pt, each one tensor saved from Python with torch.save
// (support [S,3,H,W] normalised images, support_labels [S,way] one-hot, query [Q,3,H,W]).
// The scores [Q,way] go to SCORES_FILE (default EPISODE_DIR/scores.pt; torch.load reads
// it) and, with each query's arg-max, to stdout as CSV.
#include <dlfcn.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include <torch/script.h>
#include <torch/serialize.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

namespace {

torch::Tensor read_tensor(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot read " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  // torch::pickle_load reads what Python's torch.save writes; it builds tensors and plain
  // containers only, and runs no Python.
  return torch::pickle_load(bytes).toTensor();
}

void write_tensor(const std::string& path, const torch::Tensor& tensor) {
  std::vector<char> bytes = torch::pickle_save(tensor);
  std::ofstream file(path, std::ios::binary);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!file) throw std::runtime_error("cannot write " + path);
}

bool ends_with(const std::string& text, const std::string& tail) {
  return text.size() >= tail.size() && text.compare(text.size() - tail.size(), tail.size(), tail) == 0;
}

torch::Tensor run(const std::string& artifact, const std::vector<torch::Tensor>& episode) {
  if (ends_with(artifact, ".pt2")) {
    torch::inductor::AOTIModelPackageLoader loader(artifact);
    return loader.run(episode).at(0);
  }
  torch::jit::Module module = torch::jit::load(artifact, torch::kCPU);
  module.eval();
  std::vector<torch::jit::IValue> inputs(episode.begin(), episode.end());
  return module.forward(inputs).toTensor();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::cerr << "usage: " << argv[0] << " OP_LIBRARY ARTIFACT EPISODE_DIR [SCORES_FILE]\n";
    return 2;
  }
  const std::string op_library = argv[1], artifact = argv[2], episode_dir = argv[3];
  const std::string scores_file = argc == 5 ? argv[4] : episode_dir + "/scores.pt";
  // RTLD_GLOBAL: the op registers itself with the dispatcher libtorch already holds
  if (dlopen(op_library.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::cerr << "error: cannot load the op library: " << dlerror() << "\n";
    return 1;
  }
  try {
    torch::InferenceMode guard;
    std::vector<torch::Tensor> episode;
    for (const char* name : {"support", "support_labels", "query"})
      episode.push_back(read_tensor(episode_dir + "/" + name + ".pt").to(torch::kFloat32).contiguous());
    torch::Tensor scores = run(artifact, episode).to(torch::kCPU).contiguous();
    write_tensor(scores_file, scores);
    auto predicted = scores.argmax(1);
    std::cout << "query,predicted";
    for (int64_t k = 0; k < scores.size(1); ++k) std::cout << ",score_" << k;
    std::cout << "\n";
    auto table = scores.accessor<float, 2>();
    for (int64_t q = 0; q < scores.size(0); ++q) {
      std::cout << q << "," << predicted[q].item<int64_t>();
      for (int64_t k = 0; k < scores.size(1); ++k) std::cout << "," << table[q][k];
      std::cout << "\n";
    }
  } catch (const std::exception& error) {
    std::string what = error.what();
    std::cerr << "error: " << what.substr(0, what.find('\n')) << "\n";
    return 1;
  }
  return 0;
}
