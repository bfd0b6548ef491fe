// Graph files: a versioned little-endian binary format, so a graph recorded in
// Python can run in a C++ program. Loading never trusts the bytes: every count,
// index, size and nesting depth is checked, and a bad file raises
// std::invalid_argument instead of crashing. See docs/graph-format.md.
#pragma once

#include <fastinterleave/graph.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace fastinterleave {

constexpr uint32_t kGraphFormatVersion = 2;
// Tensor files (serialize_tensors) kept their layout: still version 1.
constexpr uint32_t kTensorFormatVersion = 1;

// Names for saved values: (name, node). Names are unique and non-empty, and each
// names a node marked saved.
using SavedNames = std::vector<std::pair<std::string, int32_t>>;

// How a site's value looked in Python, so a C++ host whose module returns the
// same tensors in another shape (torch.jit.trace flattens a submodule's output
// tuple into its tensors) can present the value as the graph expects it.
// Tensor leaves are matched in depth-first order.
struct ValueStructure {
  enum class Kind : uint8_t {
    Tensor = 0,  // a tensor leaf; `ndim` its number of dimensions (checked when matched)
    Const = 1,   // None, a bool, int, float or string: `value`
    Tuple = 2,   // `items`
    List = 3,    // `items`
    Dict = 4,    // `keys` -> `items`
    Record = 5,  // named fields (a transformers ModelOutput): `keys` -> `items`
    Opaque = 6,  // a Python object no C++ value stands for (`type_name`): seen as None
  };
  Kind kind = Kind::Tensor;
  int32_t ndim = 0;
  c10::IValue value;
  std::string type_name;
  std::vector<std::string> keys;
  std::vector<ValueStructure> items;

  // How many tensor leaves it holds.
  size_t num_tensors() const;
};

// A graph file: the graph, plus what the Python exporter adds for C++ hosts.
struct GraphFile {
  Graph graph;
  SavedNames names;
  // Per entry of graph.sites: the value's structure when the exporter recorded it.
  std::vector<std::optional<ValueStructure>> structures;
};

// Throws std::invalid_argument when the graph holds what a file cannot: a node
// that only Python can run, or a constant of a Python-only type (the message
// names the node's line).
std::string serialize_graph(const Graph& graph);
std::string serialize_graph_file(const GraphFile& file);
// Strict: throws std::invalid_argument for any malformed, truncated or
// inconsistent input.
Graph deserialize_graph(const std::string& bytes);
GraphFile deserialize_graph_file(const std::string& bytes);

void save_graph(const Graph& graph, const std::string& path);
Graph load_graph(const std::string& path);
void save_graph_file(const GraphFile& file, const std::string& path);
GraphFile load_graph_file(const std::string& path);

// Named tensors in the same encoding (test data, probe results).
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;
std::string serialize_tensors(const NamedTensors& tensors);
NamedTensors deserialize_tensors(const std::string& bytes);

std::string read_file(const std::string& path);
void write_file(const std::string& path, const std::string& bytes);

}  // namespace fastinterleave
