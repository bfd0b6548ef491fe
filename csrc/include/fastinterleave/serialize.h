// Graph files: a versioned little-endian binary format, so a graph recorded in
// Python can run in a C++ program. Loading never trusts the bytes: every count,
// index, size and nesting depth is checked, and a bad file raises
// std::invalid_argument instead of crashing. See docs/graph-format.md.
#pragma once

#include <fastinterleave/graph.h>

#include <string>
#include <utility>
#include <vector>

namespace fastinterleave {

constexpr uint32_t kGraphFormatVersion = 1;

// Throws std::invalid_argument when the graph holds what a file cannot: a node
// that only Python can run (its message names the node's line).
std::string serialize_graph(const Graph& graph);
Graph deserialize_graph(const std::string& bytes);

void save_graph(const Graph& graph, const std::string& path);
Graph load_graph(const std::string& path);

// Named tensors in the same encoding (test data, probe results).
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;
std::string serialize_tensors(const NamedTensors& tensors);
NamedTensors deserialize_tensors(const std::string& bytes);

std::string read_file(const std::string& path);
void write_file(const std::string& path, const std::string& bytes);

}  // namespace fastinterleave
