// A fuzz target over the graph-file loader: mutates valid graph files at
// random for a bounded time and loads, compiles and runs each result. A bad
// file must give an exception, never a crash, a hang or an out-of-bounds read
// (built with AddressSanitizer when the toolchain has it).
//
//   fuzz_graph [--seconds N] [--seed S] [FILE...]
//   FILE: more valid graph files to start from (e.g. ones exported from Python)
#include <fastinterleave/compiler.h>
#include <fastinterleave/scheduler.h>
#include <fastinterleave/serialize.h>

#include <ATen/ATen.h>

#include <chrono>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace fastinterleave;
using c10::IValue;

namespace {

Arg ref(int32_t i) { return Arg::make_ref(i); }
Arg c(IValue v) { return Arg::make_const(std::move(v)); }
Arg seq(Arg::Kind k, std::vector<Arg> items) { return Arg::make_seq(k, std::move(items)); }

Node node(Op op, std::vector<Arg> args, const std::string& name = "", int32_t invoker = 0) {
  Node n;
  n.op = op;
  n.args = std::move(args);
  n.name = name;
  n.invoker = invoker;
  return n;
}

Node site(int32_t s, int32_t invoker = 0) {
  Node n;
  n.op = Op::Site;
  n.site = s;
  n.invoker = invoker;
  return n;
}

ValueStructure leaf(int32_t ndim) {
  ValueStructure s;
  s.ndim = ndim;
  return s;
}

// Valid files using every op, argument kind, constant tag and file section.
std::vector<std::string> seeds() {
  std::vector<std::string> out;
  {
    GraphFile f;
    Graph& g = f.graph;
    g.batch_size = 3;
    g.invokers = {InvokerSlice{0, 1}, InvokerSlice{1, 2}};
    g.sites = {SiteKey{"l1", HookKind::Output}, SiteKey{"l2", HookKind::Input}, SiteKey{"", HookKind::Output}};
    g.lines = {"model.py:3", "model.py:4"};
    Arg all = seq(Arg::Kind::Slice, {c(IValue()), c(IValue()), c(IValue(int64_t{1}))});
    g.nodes.push_back(site(0));                                                            // 0
    g.nodes.push_back(node(Op::Call, {ref(0), c(IValue(2.5))}, "mul"));                    // 1
    g.nodes.back().line = 0;
    g.nodes.push_back(node(Op::GetItem, {ref(1), seq(Arg::Kind::Tuple, {all, c(IValue(int64_t{0}))})}));  // 2
    g.nodes.push_back(node(Op::SetItem, {ref(1), seq(Arg::Kind::Tuple, {Arg{Arg::Kind::Ellipsis}, c(IValue(int64_t{1}))}),
                                         c(IValue(at::zeros({1})))}));                     // 3
    g.nodes.push_back(node(Op::GetAttr, {ref(1)}, "shape"));                               // 4
    g.nodes.push_back(node(Op::Call, {ref(1)}, "sum"));                                    // 5
    g.nodes.back().kwargs.emplace_back("dim", c(IValue(int64_t{1})));
    g.nodes.back().saved = true;
    g.nodes.push_back(node(Op::Swap, {ref(0), ref(1)}));                                   // 6
    Node in = site(1, 1);
    in.projection = Projection::FirstArg;
    in.iteration = 0;
    in.iter_stop = 2;
    g.nodes.push_back(in);                                                                 // 7
    g.nodes.push_back(node(Op::Identity, {seq(Arg::Kind::List, {c(IValue(int64_t{1})), c(IValue(int64_t{2}))})}, "", 1));  // 8
    Arg dict;
    dict.kind = Arg::Kind::Dict;
    dict.keys = {"a", "b"};
    dict.items = {ref(7), c(IValue(std::string("text")))};
    g.nodes.push_back(node(Op::Identity, {dict}, "", 1));                                  // 9
    g.nodes.back().saved = true;
    Node root = site(2);
    root.iter_list = {0, 2};
    g.nodes.push_back(root);                                                               // 10
    g.nodes.push_back(node(Op::Call, {ref(10), c(IValue(at::ones({2, 2}, at::kDouble)))}, "add|matmul"));  // 11
    g.nodes.back().saved = true;
    g.nodes.push_back(node(Op::Stop, {}));                                                 // 12
    f.names = {{"total", 5}, {"d", 9}, {"root", 11}};
    ValueStructure rec;
    rec.kind = ValueStructure::Kind::Record;
    rec.keys = {"logits", "past"};
    ValueStructure opaque;
    opaque.kind = ValueStructure::Kind::Opaque;
    opaque.type_name = "DynamicCache";
    rec.items = {leaf(3), opaque};
    ValueStructure tup;
    tup.kind = ValueStructure::Kind::Tuple;
    ValueStructure none;
    none.kind = ValueStructure::Kind::Const;
    tup.items = {leaf(2), none};
    ValueStructure list;
    list.kind = ValueStructure::Kind::List;
    list.items = {leaf(1)};
    ValueStructure dct;
    dct.kind = ValueStructure::Kind::Dict;
    dct.keys = {"k"};
    dct.items = {list};
    tup.items.push_back(dct);
    f.structures = {tup, std::nullopt, rec};
    out.push_back(serialize_graph_file(f));
  }
  {
    GraphFile f;
    Graph& g = f.graph;
    g.batch_size = 2;
    g.invokers = {InvokerSlice{0, 2}};
    g.sites = {SiteKey{"h.0", HookKind::Output}};
    g.nodes.push_back(site(0));
    Node grad = node(Op::Grad, {ref(0)});
    g.nodes.push_back(grad);
    g.nodes.push_back(node(Op::Call, {ref(0), c(IValue(at::full({2}, true))), c(IValue(at::arange(4, at::kInt))),
                                      c(IValue(at::ones({1}, at::kHalf))), c(IValue(c10::Device("cpu"))),
                                      c(make_dtype(at::kBFloat16)), c(IValue(false))},
                           "neg"));
    g.nodes.back().saved = true;
    f.names = {{"n", 2}};
    out.push_back(serialize_graph_file(f));
  }
  return out;
}

// Loads a graph file, then runs it against made-up values, as a host would
// fire its sites. `loaded` is set once the file passed the loader.
void exercise(const std::string& bytes, bool& loaded) {
  GraphFile file = deserialize_graph_file(bytes);
  loaded = true;
  auto plan = compile(std::make_shared<const Graph>(std::move(file.graph)));
  Run run(plan, {});
  try {
    run.begin();
    for (int round = 0; round < 2; ++round) {
      for (size_t s = 0; s < plan->sites.size(); ++s) {
        const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(plan->graph->batch_size, 8));
        at::Tensor t = at::arange(rows * 4, at::kFloat).reshape({rows, 4});
        IValue v = plan->sites[s].key.kind == HookKind::Output
                       ? IValue(t)
                       : IValue(c10::ivalue::Tuple::create(
                             {IValue(c10::ivalue::Tuple::create({IValue(t)})),
                              IValue(c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get()))}));
        run.fire(static_cast<int32_t>(s), v);
      }
    }
    run.end();
  } catch (const EarlyStop&) {
    run.end_stopped();
  }
  for (size_t i = 0; i < plan->size(); ++i) {
    if (run.has_value(static_cast<int32_t>(i))) run.value(static_cast<int32_t>(i));
  }
}

class Mutator {
 public:
  explicit Mutator(uint64_t seed) : rng_(seed) {}

  std::string mutate(const std::vector<std::string>& pool) {
    std::string s = pool[pick(pool.size())];
    const int steps = pick(2) ? 1 : 2 + static_cast<int>(pick(4));  // mostly one change: loads more often
    for (int k = 0; k < steps; ++k) step(s, pool);
    return s;
  }

 private:
  size_t pick(size_t n) { return n ? std::uniform_int_distribution<size_t>(0, n - 1)(rng_) : 0; }

  void step(std::string& s, const std::vector<std::string>& pool) {
    static const int64_t kInteresting[] = {0, 1, -1, 2, -2, 3, 7, 8, 16, 34, 64, 127, 128, 255, 256, 1 << 16,
                                           std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min(),
                                           std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min()};
    if (s.empty()) {
      s = pool[pick(pool.size())];
      return;
    }
    switch (pick(9)) {
      case 0: s[pick(s.size())] ^= static_cast<char>(1u << pick(8)); break;
      case 1: s[pick(s.size())] = static_cast<char>(pick(256)); break;
      case 2: {  // an interesting little-endian integer over 1, 2, 4 or 8 bytes
        const size_t width = size_t{1} << pick(4);
        if (s.size() < width) break;
        const int64_t v = kInteresting[pick(sizeof(kInteresting) / sizeof(kInteresting[0]))];
        std::memcpy(&s[pick(s.size() - width + 1)], &v, width);
        break;
      }
      case 3: s.resize(pick(s.size())); break;
      case 4: {  // insert random bytes
        std::string ins(1 + pick(16), '\0');
        for (auto& ch : ins) ch = static_cast<char>(pick(256));
        s.insert(pick(s.size() + 1), ins);
        break;
      }
      case 5: {  // delete a range
        const size_t at = pick(s.size());
        s.erase(at, 1 + pick(std::min<size_t>(32, s.size() - at)));
        break;
      }
      case 6: {  // duplicate a range
        const size_t at = pick(s.size());
        const std::string part = s.substr(at, 1 + pick(32));
        s.insert(pick(s.size() + 1), part);
        break;
      }
      case 7: {  // splice: the head of this file, the tail of another
        const std::string& other = pool[pick(pool.size())];
        s = s.substr(0, pick(s.size() + 1)) + other.substr(pick(other.size() + 1));
        break;
      }
      default: {  // add or subtract a little from a byte
        auto& ch = s[pick(s.size())];
        ch = static_cast<char>(ch + static_cast<char>(static_cast<int>(pick(9)) - 4));
      }
    }
  }

  std::mt19937_64 rng_;
};

}  // namespace

int main(int argc, char** argv) {
  double seconds = 10;
  uint64_t seed = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  std::vector<std::string> pool = seeds();
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) seconds = std::stod(argv[++i]);
    else if (a == "--seed" && i + 1 < argc) seed = std::stoull(argv[++i]);
    else pool.push_back(read_file(a));
  }
  std::cout << "fuzz_graph: " << pool.size() << " seed files, seed " << seed << ", " << seconds << " s" << std::endl;
  for (const auto& s : pool) deserialize_graph_file(s);  // the seeds themselves are valid files

  Mutator mutator(seed);
  const auto stop = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  uint64_t runs = 0, loaded = 0, ran = 0;
  while (std::chrono::steady_clock::now() < stop) {
    for (int k = 0; k < 64; ++k, ++runs) {
      const std::string bytes = mutator.mutate(pool);
      bool ok = false;
      try {
        exercise(bytes, ok);
        ++ran;
      } catch (const std::exception&) {
        // a clean rejection (or a run error) is what a bad file must give
      }
      loaded += ok ? 1 : 0;
    }
  }
  std::cout << "fuzz_graph: " << runs << " mutated files: " << loaded << " loaded, " << ran
            << " ran to the end; no crash" << std::endl;
  return 0;
}
