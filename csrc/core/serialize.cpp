#include <fastinterleave/serialize.h>
#include <fastinterleave/ops.h>

#include <ATen/ATen.h>

#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace fastinterleave {

using c10::IValue;

namespace {

constexpr char kGraphMagic[8] = {'F', 'I', 'G', 'R', 'A', 'P', 'H', 0};
constexpr char kTensorMagic[8] = {'F', 'I', 'T', 'E', 'N', 'S', 'O', 'R'};
constexpr int kMaxDepth = 64;
constexpr uint64_t kMaxString = 1u << 20;

enum class Tag : uint8_t { None = 0, Bool = 1, Int = 2, Double = 3, String = 4, Tensor = 5, Tuple = 6, List = 7, Device = 8, DType = 9 };

// The offset of the first byte of `s` that is not valid UTF-8 (overlong forms,
// surrogates and code points past U+10FFFF included), or npos.
size_t utf8_error(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    size_t len;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return i;
    }
    if (i + len > n) return i;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::string::npos;
}

class Writer {
 public:
  template <typename T>
  void pod(T v) {
    static_assert(std::is_trivially_copyable_v<T>);
    out_.append(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  void str(const std::string& s) {
    pod<uint32_t>(static_cast<uint32_t>(s.size()));
    out_.append(s);
  }
  void bytes(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  void tensor(const at::Tensor& t0) {
    at::Tensor t = t0.detach().to(at::kCPU).contiguous();
    pod<uint8_t>(static_cast<uint8_t>(t.scalar_type()));
    pod<uint32_t>(static_cast<uint32_t>(t.dim()));
    for (int64_t s : t.sizes()) pod<int64_t>(s);
    const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    pod<uint64_t>(nbytes);
    if (nbytes) bytes(t.data_ptr(), nbytes);
  }
  void value(const IValue& v, int depth = 0) {
    if (depth > kMaxDepth) throw std::invalid_argument("value nested too deeply to save");
    if (v.isNone()) pod(Tag::None);
    else if (v.isBool()) { pod(Tag::Bool); pod<uint8_t>(v.toBool()); }
    else if (v.isInt()) { pod(Tag::Int); pod<int64_t>(v.toInt()); }
    else if (v.isDouble()) { pod(Tag::Double); pod<double>(v.toDouble()); }
    else if (v.isString()) { pod(Tag::String); str(v.toStringRef()); }
    else if (v.isTensor()) { pod(Tag::Tensor); tensor(v.toTensor()); }
    else if (v.isDevice()) { pod(Tag::Device); str(v.toDevice().str()); }
    else if (auto dtype = as_dtype(v)) { pod(Tag::DType); pod<uint8_t>(static_cast<uint8_t>(*dtype)); }
    else if (v.isTuple() || v.isList()) {
      pod(v.isTuple() ? Tag::Tuple : Tag::List);
      c10::ArrayRef<IValue> items = v.isTuple() ? v.toTupleRef().elements() : v.toListRef();
      pod<uint32_t>(static_cast<uint32_t>(items.size()));
      for (const auto& x : items) value(x, depth + 1);
    } else {
      throw std::invalid_argument(std::string("a constant of type ") + (v.isCapsule() ? "Python object" : v.tagKind()) +
                                  " cannot be saved in a graph file");
    }
  }
  void arg(const Arg& a, int depth = 0) {
    if (depth > kMaxDepth) throw std::invalid_argument("argument nested too deeply to save");
    pod<uint8_t>(static_cast<uint8_t>(a.kind));
    switch (a.kind) {
      case Arg::Kind::Ref: pod<int32_t>(a.ref); break;
      case Arg::Kind::Const: value(a.value); break;
      case Arg::Kind::Ellipsis: break;
      case Arg::Kind::Dict:
        pod<uint32_t>(static_cast<uint32_t>(a.items.size()));
        for (size_t i = 0; i < a.items.size(); ++i) { str(a.keys[i]); arg(a.items[i], depth + 1); }
        break;
      default:
        pod<uint32_t>(static_cast<uint32_t>(a.items.size()));
        for (const auto& x : a.items) arg(x, depth + 1);
    }
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

class Reader {
 public:
  explicit Reader(const std::string& in) : in_(in) {}
  template <typename T>
  T pod() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, in_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  void need(uint64_t n) const {
    if (n > in_.size() - pos_) fail("truncated file");
  }
  // A count of items each at least `min_bytes` long: bounded by what is left.
  uint32_t count(uint64_t min_bytes) {
    auto n = pod<uint32_t>();
    if (min_bytes && n > (in_.size() - pos_) / min_bytes) fail("a count exceeds the file's size");
    return n;
  }
  std::string str() {
    auto n = pod<uint32_t>();
    if (n > kMaxString) fail("string too long");
    need(n);
    std::string s = in_.substr(pos_, n);
    if (const size_t bad = utf8_error(s); bad != std::string::npos) {
      pos_ += bad;
      fail("a string is not valid UTF-8");
    }
    pos_ += n;
    return s;
  }
  at::Tensor tensor() {
    auto st = pod<uint8_t>();
    if (st >= static_cast<uint8_t>(at::ScalarType::NumOptions)) fail("unknown tensor dtype");
    auto dtype = static_cast<at::ScalarType>(st);
    switch (dtype) {
      case at::kFloat: case at::kDouble: case at::kHalf: case at::kBFloat16: case at::kLong: case at::kInt:
      case at::kShort: case at::kChar: case at::kByte: case at::kBool:
        break;
      default:
        fail("unsupported tensor dtype");
    }
    auto ndim = pod<uint32_t>();
    if (ndim > 64) fail("tensor has too many dimensions");
    std::vector<int64_t> sizes(ndim);
    uint64_t numel = 1;
    for (auto& s : sizes) {
      s = pod<int64_t>();
      if (s < 0) fail("negative tensor size");
      if (s && numel > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(s)) fail("tensor size overflows");
      numel *= static_cast<uint64_t>(s);
    }
    auto nbytes = pod<uint64_t>();
    const uint64_t elem = c10::elementSize(dtype);
    if (numel > std::numeric_limits<uint64_t>::max() / elem || nbytes != numel * elem) {
      fail("tensor byte count does not match its shape");
    }
    need(nbytes);
    at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(dtype));
    if (nbytes) std::memcpy(t.data_ptr(), in_.data() + pos_, nbytes);
    pos_ += nbytes;
    if (dtype == at::kBool) t = t.view(at::kByte).ne(0);  // any nonzero byte is true
    return t;
  }
  IValue value(int depth = 0) {
    if (depth > kMaxDepth) fail("value nested too deeply");
    switch (static_cast<Tag>(pod<uint8_t>())) {
      case Tag::None: return IValue();
      case Tag::Bool: return IValue(pod<uint8_t>() != 0);
      case Tag::Int: return IValue(pod<int64_t>());
      case Tag::Double: return IValue(pod<double>());
      case Tag::String: return IValue(str());
      case Tag::Tensor: return IValue(tensor());
      case Tag::Device:
        try {
          return IValue(c10::Device(str()));
        } catch (const c10::Error&) {
          fail("bad device string");
        }
      case Tag::DType: {
        auto st = pod<uint8_t>();
        if (st >= static_cast<uint8_t>(at::ScalarType::NumOptions)) fail("unknown dtype");
        return make_dtype(static_cast<at::ScalarType>(st));
      }
      case Tag::Tuple: {
        auto n = count(1);
        std::vector<IValue> items;
        for (uint32_t i = 0; i < n; ++i) items.push_back(value(depth + 1));
        return IValue(c10::ivalue::Tuple::create(std::move(items)));
      }
      case Tag::List: {
        auto n = count(1);
        Arg list = Arg::make_seq(Arg::Kind::List, {});
        for (uint32_t i = 0; i < n; ++i) list.items.push_back(Arg::make_const(value(depth + 1)));
        return *to_ivalue(list);
      }
    }
    fail("unknown value tag");
  }
  Arg arg(int depth = 0) {
    if (depth > kMaxDepth) fail("argument nested too deeply");
    auto kind = pod<uint8_t>();
    if (kind > static_cast<uint8_t>(Arg::Kind::Ellipsis)) fail("unknown argument kind");
    Arg a;
    a.kind = static_cast<Arg::Kind>(kind);
    switch (a.kind) {
      case Arg::Kind::Ref: a.ref = pod<int32_t>(); break;
      case Arg::Kind::Const: a.value = value(); break;
      case Arg::Kind::Ellipsis: break;
      case Arg::Kind::Dict: {
        auto n = count(5);
        for (uint32_t i = 0; i < n; ++i) { a.keys.push_back(str()); a.items.push_back(arg(depth + 1)); }
        break;
      }
      default: {
        auto n = count(1);
        for (uint32_t i = 0; i < n; ++i) a.items.push_back(arg(depth + 1));
      }
    }
    return a;
  }
  void magic(const char (&m)[8]) {
    need(8);
    if (std::memcmp(in_.data(), m, 8) != 0) fail("not a fastinterleave file (bad magic)");
    pos_ = 8;
  }
  bool at_end() const { return pos_ == in_.size(); }
  [[noreturn]] void fail(const std::string& why) const {
    throw std::invalid_argument("bad fastinterleave file at byte " + std::to_string(pos_) + ": " + why);
  }

 private:
  const std::string& in_;
  size_t pos_ = 0;
};

}  // namespace

size_t ValueStructure::num_tensors() const {
  if (kind == Kind::Tensor) return 1;
  size_t n = 0;
  for (const auto& x : items) n += x.num_tensors();
  return n;
}

namespace {

void write_structure(Writer& w, const ValueStructure& s, int depth = 0) {
  if (depth > kMaxDepth) throw std::invalid_argument("value structure nested too deeply to save");
  w.pod<uint8_t>(static_cast<uint8_t>(s.kind));
  switch (s.kind) {
    case ValueStructure::Kind::Tensor: w.pod<int32_t>(s.ndim); break;
    case ValueStructure::Kind::Const: w.value(s.value); break;
    case ValueStructure::Kind::Opaque: w.str(s.type_name); break;
    case ValueStructure::Kind::Tuple:
    case ValueStructure::Kind::List:
      w.pod<uint32_t>(static_cast<uint32_t>(s.items.size()));
      for (const auto& x : s.items) write_structure(w, x, depth + 1);
      break;
    case ValueStructure::Kind::Dict:
    case ValueStructure::Kind::Record:
      if (s.keys.size() != s.items.size()) throw std::invalid_argument("value structure: keys and items differ in number");
      w.pod<uint32_t>(static_cast<uint32_t>(s.items.size()));
      for (size_t i = 0; i < s.items.size(); ++i) { w.str(s.keys[i]); write_structure(w, s.items[i], depth + 1); }
      break;
  }
}

ValueStructure read_structure(Reader& r, int depth = 0) {
  if (depth > kMaxDepth) r.fail("value structure nested too deeply");
  auto kind = r.pod<uint8_t>();
  if (kind > static_cast<uint8_t>(ValueStructure::Kind::Opaque)) r.fail("unknown value structure kind");
  ValueStructure s;
  s.kind = static_cast<ValueStructure::Kind>(kind);
  switch (s.kind) {
    case ValueStructure::Kind::Tensor:
      s.ndim = r.pod<int32_t>();
      if (s.ndim < 0 || s.ndim > 64) r.fail("bad tensor rank in a value structure");
      break;
    case ValueStructure::Kind::Const:
      s.value = r.value(kMaxDepth);  // a scalar: no nesting
      if (!(s.value.isNone() || s.value.isBool() || s.value.isInt() || s.value.isDouble() || s.value.isString())) {
        r.fail("a value structure constant must be None, a bool, an int, a float or a string");
      }
      break;
    case ValueStructure::Kind::Opaque: s.type_name = r.str(); break;
    case ValueStructure::Kind::Tuple:
    case ValueStructure::Kind::List: {
      auto n = r.count(1);
      for (uint32_t i = 0; i < n; ++i) s.items.push_back(read_structure(r, depth + 1));
      break;
    }
    case ValueStructure::Kind::Dict:
    case ValueStructure::Kind::Record: {
      auto n = r.count(5);
      for (uint32_t i = 0; i < n; ++i) {
        s.keys.push_back(r.str());
        s.items.push_back(read_structure(r, depth + 1));
      }
      break;
    }
  }
  return s;
}

}  // namespace

std::string serialize_graph_file(const GraphFile& file) {
  const Graph& g = file.graph;
  g.validate();
  Writer w;
  w.bytes(kGraphMagic, 8);
  w.pod<uint32_t>(kGraphFormatVersion);
  w.pod<int64_t>(g.batch_size);
  w.pod<uint32_t>(static_cast<uint32_t>(g.invokers.size()));
  for (const auto& inv : g.invokers) { w.pod<int64_t>(inv.start); w.pod<int64_t>(inv.size); }
  w.pod<uint32_t>(static_cast<uint32_t>(g.sites.size()));
  for (const auto& s : g.sites) { w.str(s.module); w.pod<uint8_t>(static_cast<uint8_t>(s.kind)); }
  w.pod<uint32_t>(static_cast<uint32_t>(g.lines.size()));
  for (const auto& l : g.lines) w.str(l);
  w.pod<uint32_t>(static_cast<uint32_t>(g.nodes.size()));
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    const Node& n = g.nodes[i];
    auto where = [&] { return g.describe(static_cast<int32_t>(i)); };
    if (n.py_fn >= 0 && n.name.empty()) {
      throw std::invalid_argument("cannot export: this node runs Python code, which a graph file cannot hold: " + where());
    }
    try {
      w.pod<uint8_t>(static_cast<uint8_t>(n.op));
      w.str(n.name);
      w.pod<uint32_t>(static_cast<uint32_t>(n.args.size()));
      for (const auto& a : n.args) w.arg(a);
      w.pod<uint32_t>(static_cast<uint32_t>(n.kwargs.size()));
      for (const auto& kw : n.kwargs) { w.str(kw.first); w.arg(kw.second); }
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("cannot export: ") + e.what() + ": " + where());
    }
    w.pod<int32_t>(n.site);
    w.pod<int32_t>(n.iteration);
    w.pod<int32_t>(n.iter_stop);
    w.pod<uint32_t>(static_cast<uint32_t>(n.iter_list.size()));
    for (int32_t c : n.iter_list) w.pod<int32_t>(c);
    w.pod<int32_t>(n.invoker);
    w.pod<uint8_t>(static_cast<uint8_t>(n.projection));
    w.pod<int32_t>(n.line);
    w.pod<uint8_t>(n.saved ? 1 : 0);
  }
  // Version 2: names of saved values, then the structures of site values.
  w.pod<uint32_t>(static_cast<uint32_t>(file.names.size()));
  for (const auto& [name, node] : file.names) { w.str(name); w.pod<int32_t>(node); }
  if (!file.structures.empty() && file.structures.size() != g.sites.size()) {
    throw std::invalid_argument("cannot export: one value structure per site expected");
  }
  uint32_t nstruct = 0;
  for (const auto& s : file.structures) nstruct += s ? 1 : 0;
  w.pod<uint32_t>(nstruct);
  for (size_t i = 0; i < file.structures.size(); ++i) {
    if (!file.structures[i]) continue;
    w.pod<int32_t>(static_cast<int32_t>(i));
    write_structure(w, *file.structures[i]);
  }
  std::string bytes = w.take();
  deserialize_graph_file(bytes);  // what we write, we can read: names and structures checked too
  return bytes;
}

std::string serialize_graph(const Graph& g) {
  GraphFile file;
  file.graph = g;
  return serialize_graph_file(file);
}

GraphFile deserialize_graph_file(const std::string& bytes) {
  Reader r(bytes);
  r.magic(kGraphMagic);
  auto version = r.pod<uint32_t>();
  if (version != kGraphFormatVersion) {
    r.fail("unsupported graph file version " + std::to_string(version) + " (this build reads version " +
           std::to_string(kGraphFormatVersion) + ")");
  }
  GraphFile file;
  Graph& g = file.graph;
  g.batch_size = r.pod<int64_t>();
  auto ninv = r.count(16);
  for (uint32_t i = 0; i < ninv; ++i) {
    InvokerSlice s;
    s.start = r.pod<int64_t>();
    s.size = r.pod<int64_t>();
    // Checked here without overflow (any int64 pair can come in).
    if (s.start < 0 || s.size < 0 || s.start > g.batch_size || s.size > g.batch_size - s.start) {
      r.fail("an invoker's rows lie outside the batch");
    }
    g.invokers.push_back(s);
  }
  auto nsites = r.count(5);
  for (uint32_t i = 0; i < nsites; ++i) {
    SiteKey k;
    k.module = r.str();
    auto kind = r.pod<uint8_t>();
    if (kind > 1) r.fail("unknown hook kind");
    k.kind = static_cast<HookKind>(kind);
    g.sites.push_back(std::move(k));
  }
  auto nlines = r.count(4);
  for (uint32_t i = 0; i < nlines; ++i) g.lines.push_back(r.str());
  auto nnodes = r.count(34);
  for (uint32_t i = 0; i < nnodes; ++i) {
    Node n;
    auto op = r.pod<uint8_t>();
    if (op >= static_cast<uint8_t>(Op::kCount)) r.fail("unknown op");
    n.op = static_cast<Op>(op);
    n.name = r.str();
    auto nargs = r.count(1);
    for (uint32_t k = 0; k < nargs; ++k) n.args.push_back(r.arg());
    auto nkw = r.count(5);
    for (uint32_t k = 0; k < nkw; ++k) {
      auto key = r.str();
      n.kwargs.emplace_back(std::move(key), r.arg());
    }
    n.site = r.pod<int32_t>();
    n.iteration = r.pod<int32_t>();
    n.iter_stop = r.pod<int32_t>();
    auto ncalls = r.count(4);
    for (uint32_t k = 0; k < ncalls; ++k) n.iter_list.push_back(r.pod<int32_t>());
    n.invoker = r.pod<int32_t>();
    auto proj = r.pod<uint8_t>();
    if (proj > 1) r.fail("unknown projection");
    n.projection = static_cast<Projection>(proj);
    n.line = r.pod<int32_t>();
    auto saved = r.pod<uint8_t>();
    if (saved > 1) r.fail("bad saved flag");
    n.saved = saved != 0;
    g.nodes.push_back(std::move(n));
  }
  auto nnames = r.count(8);
  for (uint32_t i = 0; i < nnames; ++i) {
    auto name = r.str();
    auto node = r.pod<int32_t>();
    if (name.empty()) r.fail("an empty name for a saved value");
    if (node < 0 || static_cast<uint32_t>(node) >= nnodes) r.fail("name '" + name + "' refers to a node out of range");
    if (!g.nodes[static_cast<size_t>(node)].saved) r.fail("name '" + name + "' refers to a node that is not saved");
    for (const auto& [other, _] : file.names) {
      if (other == name) r.fail("the name '" + name + "' is given twice");
    }
    file.names.emplace_back(std::move(name), node);
  }
  auto nstruct = r.count(6);
  if (nstruct) file.structures.resize(nsites);
  int32_t last_site = -1;
  for (uint32_t i = 0; i < nstruct; ++i) {
    auto site = r.pod<int32_t>();
    if (site <= last_site || static_cast<uint32_t>(site) >= nsites) r.fail("value structures must name distinct sites in order");
    last_site = site;
    file.structures[static_cast<size_t>(site)] = read_structure(r);
  }
  if (!r.at_end()) r.fail("trailing bytes after the graph");
  g.validate();  // indices, references (earlier nodes only: no cycles), ranges
  return file;
}

Graph deserialize_graph(const std::string& bytes) { return deserialize_graph_file(bytes).graph; }

std::string serialize_tensors(const NamedTensors& tensors) {
  Writer w;
  w.bytes(kTensorMagic, 8);
  w.pod<uint32_t>(kTensorFormatVersion);
  w.pod<uint32_t>(static_cast<uint32_t>(tensors.size()));
  for (const auto& [name, t] : tensors) { w.str(name); w.tensor(t); }
  return w.take();
}

NamedTensors deserialize_tensors(const std::string& bytes) {
  Reader r(bytes);
  r.magic(kTensorMagic);
  if (r.pod<uint32_t>() != kTensorFormatVersion) r.fail("unsupported version");
  auto n = r.count(17);
  NamedTensors out;
  for (uint32_t i = 0; i < n; ++i) {
    auto name = r.str();
    out.emplace_back(std::move(name), r.tensor());
  }
  if (!r.at_end()) r.fail("trailing bytes");
  return out;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::invalid_argument("cannot open " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw std::invalid_argument("cannot write " + path);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!f) throw std::invalid_argument("failed writing " + path);
}

void save_graph(const Graph& graph, const std::string& path) { write_file(path, serialize_graph(graph)); }
Graph load_graph(const std::string& path) { return deserialize_graph(read_file(path)); }
void save_graph_file(const GraphFile& file, const std::string& path) { write_file(path, serialize_graph_file(file)); }
GraphFile load_graph_file(const std::string& path) { return deserialize_graph_file(read_file(path)); }

}  // namespace fastinterleave
