// Resolving recorded calls to registered operators, and the value operations
// (indexing, index assignment, attributes) that Python spells with syntax.
#include <fastinterleave/ops.h>

#include <ATen/ExpandUtils.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/TensorIndexing.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/core/jit_type.h>
#include <torch/csrc/jit/runtime/operator.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>
#include <unordered_set>

namespace fastinterleave {

using c10::IValue;
using c10::TypeKind;
using c10::TypePtr;

IValue make_dtype(at::ScalarType type) { return IValue::make_capsule(c10::make_intrusive<DTypeValue>(type)); }

std::optional<at::ScalarType> as_dtype(const IValue& value) {
  if (!value.isCapsule()) return std::nullopt;
  auto holder = value.toCapsule();
  if (auto* d = dynamic_cast<DTypeValue*>(holder.get())) return d->type;
  return std::nullopt;
}

IValue make_record(c10::impl::GenericDict fields, c10::intrusive_ptr<torch::CustomClassHolder> type) {
  return IValue::make_capsule(c10::make_intrusive<Record>(std::move(fields), std::move(type)));
}

const Record* as_record(const IValue& value) {
  if (!value.isCapsule()) return nullptr;
  // The capsule's holder outlives this call: `value` keeps a reference.
  return dynamic_cast<const Record*>(value.toCapsule().get());
}

IValue map_tensors(const IValue& v, const std::function<IValue(const at::Tensor&)>& fn) {
  if (v.isTensor()) return fn(v.toTensor());
  if (v.isTuple()) {
    std::vector<IValue> items;
    for (const auto& x : v.toTupleRef().elements()) items.push_back(map_tensors(x, fn));
    return IValue(c10::ivalue::Tuple::create(std::move(items)));
  }
  if (v.isList()) {
    c10::impl::GenericList out(v.toList().elementType());
    for (const auto& x : v.toListRef()) out.push_back(map_tensors(x, fn));
    return IValue(std::move(out));
  }
  if (v.isGenericDict()) {
    auto d = v.toGenericDict();
    c10::impl::GenericDict out(d.keyType(), d.valueType());
    for (const auto& kv : d) out.insert(kv.key(), map_tensors(kv.value(), fn));
    return IValue(std::move(out));
  }
  if (const Record* r = as_record(v)) {
    return make_record(map_tensors(IValue(r->fields), fn).toGenericDict(), r->type);
  }
  return v;
}

const OpCandidates* resolve_op(const std::string& name) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<OpCandidates>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(name);
  if (it != cache.end()) return it->second.get();
  auto cands = std::make_unique<OpCandidates>();
  cands->name = name;
  // "a|b": the overloads of aten::a, then those of aten::b (Python's `//` is
  // floor_divide on tensors and floordiv on ints). "ns::op" names a namespace.
  size_t begin = 0;
  while (begin < name.size()) {
    size_t end = name.find('|', begin);
    if (end == std::string::npos) end = name.size();
    const std::string part = name.substr(begin, end - begin);
    begin = end + 1;
    if (part.empty()) continue;
    c10::Symbol sym = part.find("::") == std::string::npos ? c10::Symbol::aten(part) : c10::Symbol::fromQualString(part);
    for (const auto& op : torch::jit::getAllOperatorsFor(sym)) {
      // Operators built per graph node (OperationCreator) cannot run without one.
      if (!op->hasOperation()) continue;
      const auto& schema = op->schema();
      if (schema.is_vararg()) continue;
      bool has_out = false;
      for (const auto& a : schema.arguments()) has_out |= a.is_out();
      if (has_out || schema.overload_name() == "out") continue;
      cands->overloads.push_back(op);
    }
  }
  const OpCandidates* result = cands->overloads.empty() ? nullptr : cands.get();
  cache.emplace(name, std::move(cands));
  return result;
}

namespace {

std::optional<IValue> coerce(const TypePtr& type, std::optional<int32_t> n, const IValue& v);

// A typed list of `elem` from the elements of a list or tuple value.
std::optional<IValue> coerce_list(const TypePtr& elem, c10::ArrayRef<IValue> items) {
  switch (elem->kind()) {
    case TypeKind::IntType:
    case TypeKind::SymIntType: {
      c10::List<int64_t> out;
      out.reserve(items.size());
      for (const auto& x : items) {
        if (!x.isInt()) return std::nullopt;
        out.push_back(x.toInt());
      }
      return IValue(std::move(out));
    }
    case TypeKind::FloatType: {
      c10::List<double> out;
      for (const auto& x : items) {
        if (x.isDouble()) out.push_back(x.toDouble());
        else if (x.isInt()) out.push_back(static_cast<double>(x.toInt()));
        else return std::nullopt;
      }
      return IValue(std::move(out));
    }
    case TypeKind::BoolType: {
      c10::List<bool> out;
      for (const auto& x : items) {
        if (!x.isBool()) return std::nullopt;
        out.push_back(x.toBool());
      }
      return IValue(std::move(out));
    }
    case TypeKind::TensorType: {
      c10::List<at::Tensor> out;
      out.reserve(items.size());
      for (const auto& x : items) {
        if (!x.isTensor()) return std::nullopt;
        out.push_back(x.toTensor());
      }
      return IValue(std::move(out));
    }
    case TypeKind::OptionalType: {
      if (elem->expectRef<c10::OptionalType>().getElementType()->kind() == TypeKind::TensorType) {
        c10::List<std::optional<at::Tensor>> out;
        for (const auto& x : items) {
          if (x.isNone()) out.push_back(std::nullopt);
          else if (x.isTensor()) out.push_back(x.toTensor());
          else return std::nullopt;
        }
        return IValue(std::move(out));
      }
      [[fallthrough]];
    }
    default: {
      c10::impl::GenericList out(elem);
      for (const auto& x : items) {
        auto c = coerce(elem, std::nullopt, x);
        if (!c) return std::nullopt;
        out.push_back(std::move(*c));
      }
      return IValue(std::move(out));
    }
  }
}

std::optional<IValue> coerce(const TypePtr& type, std::optional<int32_t> n, const IValue& v) {
  switch (type->kind()) {
    case TypeKind::AnyType:
      return v;
    case TypeKind::TensorType:
      if (v.isTensor()) return v;
      return std::nullopt;
    case TypeKind::ScalarTypeType:
      if (v.isInt()) return v;
      if (auto d = as_dtype(v)) return IValue(static_cast<int64_t>(*d));
      return std::nullopt;
    case TypeKind::IntType:
    case TypeKind::SymIntType:
    case TypeKind::LayoutType:
    case TypeKind::MemoryFormatType:
      if (v.isInt()) return v;
      return std::nullopt;
    case TypeKind::FloatType:
    case TypeKind::SymFloatType:
      if (v.isDouble()) return v;
      if (v.isInt()) return IValue(static_cast<double>(v.toInt()));
      return std::nullopt;
    case TypeKind::NumberType:
      if (v.isInt() || v.isDouble() || v.isBool()) return v;
      return std::nullopt;
    case TypeKind::BoolType:
      if (v.isBool()) return v;
      return std::nullopt;
    case TypeKind::StringType:
      if (v.isString()) return v;
      return std::nullopt;
    case TypeKind::DeviceObjType:
      if (v.isDevice()) return v;
      if (v.isString()) return IValue(c10::Device(v.toStringRef()));
      return std::nullopt;
    case TypeKind::NoneType:
      if (v.isNone()) return v;
      return std::nullopt;
    case TypeKind::OptionalType:
      if (v.isNone()) return v;
      return coerce(type->expectRef<c10::OptionalType>().getElementType(), n, v);
    case TypeKind::ListType: {
      const auto& elem = type->expectRef<c10::ListType>().getElementType();
      if (v.isList()) return coerce_list(elem, v.toListRef());
      if (v.isTuple()) return coerce_list(elem, v.toTupleRef().elements());
      // Python's `x.sum(1)` passes an int where the schema says int[1].
      if (n && v.isInt() && (elem->kind() == TypeKind::IntType || elem->kind() == TypeKind::SymIntType)) {
        return IValue(c10::List<int64_t>(std::vector<int64_t>(static_cast<size_t>(*n), v.toInt())));
      }
      return std::nullopt;
    }
    case TypeKind::TupleType:
      if (v.isTuple()) return v;
      return std::nullopt;
    case TypeKind::DictType:
      if (v.isGenericDict()) return v;
      return std::nullopt;
    case TypeKind::UnionType:
      for (const auto& t : type->expectRef<c10::UnionType>().containedTypes()) {
        if (auto c = coerce(t, n, v)) return c;
      }
      return std::nullopt;
    default:
      return std::nullopt;
  }
}

bool is_sequence(const IValue& v) { return v.isList() || v.isTuple(); }

// Builds the stack for one overload, or returns false when it does not fit.
bool bind_schema(const c10::FunctionSchema& schema, const std::vector<IValue>& args, const Kwargs& kwargs,
                 torch::jit::Stack& stack) {
  const auto& params = schema.arguments();
  size_t positional_params = 0;
  for (const auto& p : params) positional_params += p.kwarg_only() ? 0 : 1;
  size_t pos = 0, kw_used = 0;
  stack.clear();
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    std::optional<IValue> v;
    if (!p.kwarg_only() && pos < args.size()) {
      size_t params_left = positional_params - i - 1;  // positional params after this one
      bool pack = p.real_type()->kind() == TypeKind::ListType && !is_sequence(args[pos]) &&
                  args.size() - pos > params_left + 1;
      if (pack) {
        // `x.view(2, -1)`: Python packs trailing ints into the int[] parameter.
        size_t count = args.size() - pos - params_left;
        std::vector<IValue> items(args.begin() + pos, args.begin() + pos + count);
        v = coerce_list(p.real_type()->expectRef<c10::ListType>().getElementType(), items);
        pos += count;
      } else {
        v = coerce(p.real_type(), p.N(), args[pos++]);
      }
    } else {
      const IValue* given = nullptr;
      for (const auto& kw : kwargs) {
        if (kw.first == p.name()) { given = &kw.second; break; }
      }
      if (given) {
        v = coerce(p.real_type(), p.N(), *given);
        ++kw_used;
      } else if (p.default_value()) {
        v = *p.default_value();
      }
    }
    if (!v) return false;
    stack.push_back(std::move(*v));
  }
  return pos == args.size() && kw_used == kwargs.size();
}

}  // namespace

std::optional<IValue> call_op(const OpCandidates& op, const std::vector<IValue>& args, const Kwargs& kwargs) {
  torch::jit::Stack stack;
  for (const auto& overload : op.overloads) {
    const auto& schema = overload->schema();
    if (!bind_schema(schema, args, kwargs, stack)) continue;
    overload->getOperation()(stack);
    const size_t n = schema.returns().size();
    if (n == 1) {
      // Tensor[] results (split, chunk, unbind) are tuples, as in Python.
      if (stack.back().isTensorList()) {
        const auto list = stack.back().toTensorVector();
        return IValue(c10::ivalue::Tuple::create(std::vector<IValue>(list.begin(), list.end())));
      }
      return std::move(stack.back());
    }
    if (n == 0) return IValue();
    std::vector<IValue> outs(std::make_move_iterator(stack.end() - static_cast<std::ptrdiff_t>(n)),
                             std::make_move_iterator(stack.end()));
    bool named = true;
    for (const auto& r : schema.returns()) named &= !r.name().empty();
    if (!named) return IValue(c10::ivalue::Tuple::create(std::move(outs)));
    // Named returns (`x.max(dim)` -> values, indices): fields reachable by name and index.
    c10::impl::GenericDict fields(c10::StringType::get(), c10::AnyType::get());
    for (size_t i = 0; i < n; ++i) fields.insert(schema.returns()[i].name(), std::move(outs[i]));
    return make_record(std::move(fields), c10::make_intrusive<ReturnTypeTag>(op.name));
  }
  return std::nullopt;
}

std::optional<IValue> to_ivalue(const Arg& a) {
  switch (a.kind) {
    case Arg::Kind::Const:
      return a.value;
    case Arg::Kind::Tuple: {
      std::vector<IValue> items;
      items.reserve(a.items.size());
      for (const auto& x : a.items) {
        auto v = to_ivalue(x);
        if (!v) return std::nullopt;
        items.push_back(std::move(*v));
      }
      return IValue(c10::ivalue::Tuple::create(std::move(items)));
    }
    case Arg::Kind::List: {
      std::vector<IValue> items;
      items.reserve(a.items.size());
      bool ints = true, doubles = true, bools = true, tensors = true;
      for (const auto& x : a.items) {
        auto v = to_ivalue(x);
        if (!v) return std::nullopt;
        ints &= v->isInt();
        doubles &= v->isDouble();
        bools &= v->isBool();
        tensors &= v->isTensor();
        items.push_back(std::move(*v));
      }
      if (!items.empty()) {
        if (ints) return coerce_list(c10::IntType::get(), items);
        if (doubles) return coerce_list(c10::FloatType::get(), items);
        if (bools) return coerce_list(c10::BoolType::get(), items);
        if (tensors) return coerce_list(c10::TensorType::get(), items);
      }
      c10::impl::GenericList out(c10::AnyType::get());
      for (auto& x : items) out.push_back(std::move(x));
      return IValue(std::move(out));
    }
    case Arg::Kind::Dict: {
      c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
      for (size_t i = 0; i < a.items.size(); ++i) {
        auto v = to_ivalue(a.items[i]);
        if (!v) return std::nullopt;
        out.insert_or_assign(a.keys[i], std::move(*v));
      }
      return IValue(std::move(out));
    }
    case Arg::Kind::Slice:
    case Arg::Kind::Ellipsis:
    case Arg::Kind::Ref:
      return std::nullopt;
  }
  return std::nullopt;
}

namespace {

std::optional<c10::SymInt> slice_bound(const Arg& a) {
  if (a.kind != Arg::Kind::Const) throw std::invalid_argument("slice bounds must be ints or None");
  if (a.value.isNone()) return std::nullopt;
  if (a.value.isInt()) return c10::SymInt(a.value.toInt());
  if (a.value.isTensor() && a.value.toTensor().numel() == 1) return c10::SymInt(a.value.toTensor().item<int64_t>());
  throw std::invalid_argument("slice bounds must be ints or None");
}

// One Python index element as a TensorIndex; false when it has no such form.
bool tensor_index(const Arg& a, std::vector<at::indexing::TensorIndex>& out) {
  using namespace at::indexing;
  switch (a.kind) {
    case Arg::Kind::Ellipsis:
      out.emplace_back(Ellipsis);
      return true;
    case Arg::Kind::Slice:
      out.emplace_back(Slice(slice_bound(a.items[0]), slice_bound(a.items[1]), slice_bound(a.items[2])));
      return true;
    case Arg::Kind::Const: {
      const IValue& v = a.value;
      if (v.isNone()) out.emplace_back(None);
      else if (v.isBool()) out.emplace_back(v.toBool());
      else if (v.isInt()) out.emplace_back(v.toInt());
      else if (v.isTensor()) out.emplace_back(v.toTensor());
      else if (v.isIntList()) out.emplace_back(at::tensor(v.toIntVector(), at::kLong));
      else if (v.isBoolList()) {
        auto bools = v.toBoolList();
        std::vector<uint8_t> raw(bools.begin(), bools.end());
        out.emplace_back(at::tensor(raw, at::kBool).to(at::kBool));
      } else return false;
      return true;
    }
    case Arg::Kind::List: {
      // x[[0, 2]]: a list of ints is an advanced index.
      auto v = to_ivalue(a);
      if (!v) return false;
      Arg c = Arg::make_const(*v);
      return tensor_index(c, out);
    }
    default:
      return false;
  }
}

bool tensor_indices(const Arg& index, std::vector<at::indexing::TensorIndex>& out) {
  if (index.kind == Arg::Kind::Tuple) {
    for (const auto& x : index.items) {
      if (!tensor_index(x, out)) return false;
    }
    return true;
  }
  if (index.kind == Arg::Kind::Const && index.value.isTuple()) {
    for (const auto& x : index.value.toTupleRef().elements()) {
      if (!tensor_index(Arg::make_const(x), out)) return false;
    }
    return true;
  }
  return tensor_index(index, out);
}

// One element of a basic index (Python semantics): an int, a slice with int or
// None bounds and a positive step, None or Ellipsis. False for anything else.
struct BasicIndex {
  enum class Kind : uint8_t { Int, Slice, None, Ellipsis } kind = Kind::Int;
  int64_t i = 0;  // Int: the index; Slice: the step
  std::optional<int64_t> start, stop;
};

bool basic_index(const IValue& v, BasicIndex& out) {
  out = BasicIndex{};
  if (v.isNone()) {
    out.kind = BasicIndex::Kind::None;
    return true;
  }
  if (v.isInt()) {  // a bool is not an int here: x[True] is a mask
    out.kind = BasicIndex::Kind::Int;
    out.i = v.toInt();
    return true;
  }
  return false;
}

bool basic_index(const Arg& a, BasicIndex& out) {
  out = BasicIndex{};
  auto bound = [](const Arg& b, std::optional<int64_t>& dst) {
    if (b.kind != Arg::Kind::Const) return false;
    if (b.value.isNone()) return true;
    if (!b.value.isInt()) return false;
    dst = b.value.toInt();
    return true;
  };
  switch (a.kind) {
    case Arg::Kind::Ellipsis:
      out.kind = BasicIndex::Kind::Ellipsis;
      return true;
    case Arg::Kind::Slice: {
      out.kind = BasicIndex::Kind::Slice;
      std::optional<int64_t> step;
      if (!bound(a.items[0], out.start) || !bound(a.items[1], out.stop) || !bound(a.items[2], step)) return false;
      out.i = step.value_or(1);
      return out.i > 0;
    }
    case Arg::Kind::Const:
      return basic_index(a.value, out);
    default:
      return false;
  }
}

// `t[index]` for a basic index, built as views (select / slice / unsqueeze) the
// way Python applies it; nullopt when the index is not basic or does not fit `t`
// (the general path then indexes, and raises the usual errors).
using BasicParts = c10::SmallVector<BasicIndex, 4>;

// The elements of an index (a tuple or one element); false when one is not basic.
bool basic_parts(const Arg& index, BasicParts& parts) {
  BasicIndex b;
  if (index.kind == Arg::Kind::Tuple) {
    for (const auto& x : index.items) {
      if (!basic_index(x, b)) return false;
      parts.push_back(b);
    }
  } else if (index.kind == Arg::Kind::Const && index.value.isTuple()) {
    for (const auto& x : index.value.toTupleRef().elements()) {
      if (!basic_index(x, b)) return false;
      parts.push_back(b);
    }
  } else {
    if (!basic_index(index, b)) return false;
    parts.push_back(b);
  }
  return true;
}

// Whether `p` is `:` over a dim of size `n` (all of it, in order).
bool full_slice(const BasicIndex& p, int64_t n) {
  return p.kind == BasicIndex::Kind::Slice && p.i == 1 && p.start.value_or(0) == 0 && (!p.stop || *p.stop >= n);
}

std::optional<at::Tensor> basic_view(const at::Tensor& t, const Arg& index) {
  BasicParts parts;
  if (!basic_parts(index, parts)) return std::nullopt;
  int64_t consumed = 0;
  int ellipses = 0;
  for (const auto& p : parts) {
    if (p.kind == BasicIndex::Kind::Int || p.kind == BasicIndex::Kind::Slice) ++consumed;
    if (p.kind == BasicIndex::Kind::Ellipsis) ++ellipses;
  }
  if (consumed > t.dim() || ellipses > 1) return std::nullopt;
  at::Tensor r = t;
  int64_t dim = 0;
  for (const auto& p : parts) {
    switch (p.kind) {
      case BasicIndex::Kind::Int: {
        const int64_t size = r.size(dim);
        if (p.i < -size || p.i >= size) return std::nullopt;
        r = r.select(dim, p.i);
        break;
      }
      case BasicIndex::Kind::Slice:
        // A full slice (`:`) is the tensor itself, as in Python's indexing: no view.
        if (!full_slice(p, r.size(dim))) r = r.slice(dim, p.start, p.stop, p.i);
        ++dim;
        break;
      case BasicIndex::Kind::None:
        r = r.unsqueeze(dim);
        ++dim;
        break;
      case BasicIndex::Kind::Ellipsis:
        dim += t.dim() - consumed;
        break;
    }
  }
  return r;
}

int64_t wrap_index(int64_t i, size_t n) {
  const auto size = static_cast<int64_t>(n);
  if (i < -size || i >= size) {
    throw c10::IndexError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
                          "index " + std::to_string(i) + " is out of range for a sequence of length " +
                              std::to_string(size));
  }
  return i < 0 ? i + size : i;
}

// Python slice semantics over a sequence of length n.
std::vector<int64_t> slice_positions(const Arg& s, size_t n) {
  auto bound = [](const Arg& a) -> std::optional<int64_t> {
    auto b = slice_bound(a);
    if (!b) return std::nullopt;
    return b->expect_int();
  };
  const auto size = static_cast<int64_t>(n);
  int64_t step = bound(s.items[2]).value_or(1);
  if (step == 0) throw std::invalid_argument("slice step cannot be zero");
  auto clamp = [&](std::optional<int64_t> b, int64_t dflt) {
    if (!b) return dflt;
    int64_t x = *b < 0 ? *b + size : *b;
    if (step > 0) return std::clamp<int64_t>(x, 0, size);
    return std::clamp<int64_t>(x, -1, size - 1);
  };
  int64_t start = clamp(bound(s.items[0]), step > 0 ? 0 : size - 1);
  int64_t stop = clamp(bound(s.items[1]), step > 0 ? size : -1);
  std::vector<int64_t> out;
  for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) out.push_back(i);
  return out;
}

}  // namespace

std::optional<IValue> get_item(const IValue& value, const Arg& index) {
  if (value.isTensor()) {
    if (auto view = basic_view(value.toTensor(), index)) return IValue(std::move(*view));
    std::vector<at::indexing::TensorIndex> idx;
    if (!tensor_indices(index, idx)) return std::nullopt;
    return IValue(value.toTensor().index(idx));
  }
  if (value.isTuple() || value.isList()) {
    c10::ArrayRef<IValue> items = value.isTuple() ? value.toTupleRef().elements() : value.toListRef();
    if (index.kind == Arg::Kind::Const && index.value.isInt()) {
      return items[static_cast<size_t>(wrap_index(index.value.toInt(), items.size()))];
    }
    if (index.kind == Arg::Kind::Slice) {
      std::vector<IValue> out;
      for (int64_t i : slice_positions(index, items.size())) out.push_back(items[static_cast<size_t>(i)]);
      if (value.isTuple()) return IValue(c10::ivalue::Tuple::create(std::move(out)));
      c10::impl::GenericList list(value.toList().elementType());
      for (auto& x : out) list.push_back(std::move(x));
      return IValue(std::move(list));
    }
    return std::nullopt;
  }
  if (const Record* r = as_record(value)) return get_item(IValue(r->fields), index);
  if (value.isGenericDict() && index.kind == Arg::Kind::Const) {
    auto dict = value.toGenericDict();
    if (index.value.isString()) {
      auto it = dict.find(index.value);
      if (it == dict.end()) {
        throw c10::IndexError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
                              "key '" + index.value.toStringRef() + "' is not in the dict");
      }
      return it->value();
    }
    if (index.value.isInt()) {
      // transformers' ModelOutput: output[i] is the i-th field that is set.
      std::vector<IValue> present;
      for (const auto& kv : dict) {
        if (!kv.value().isNone()) present.push_back(kv.value());
      }
      return present[static_cast<size_t>(wrap_index(index.value.toInt(), present.size()))];
    }
  }
  return std::nullopt;
}

namespace {

bool is_number(const IValue& v) { return v.isInt() || v.isDouble() || v.isBool(); }

// `view[...] = item` for a number or a tensor, as Python's indexing does: a number
// fills the view; a tensor, less leading size-1 dims, is broadcast and copied.
void write_view(const at::Tensor& view, const IValue& item) {
  if (is_number(item)) {
    view.fill_(item.toScalar());
  } else if (item.toTensor().dim() == 0) {
    view.fill_(item.toTensor());
  } else {
    at::Tensor src = strip_leading_ones(item.toTensor(), view.dim());
    // `h[:] = h[0]`: the source is part of what is written; Python's setitem
    // allows it, copy_ does not.
    if (at::get_overlap_status(view, src) != at::MemOverlapStatus::No) src = src.clone();
    view.copy_(src);
  }
}

bool same_number(const IValue& a, const IValue& b) {
  if (a.isInt() && b.isInt()) return a.toInt() == b.toInt();
  if (a.isDouble() && b.isDouble()) return a.toDouble() == b.toDouble();
  if (a.isBool() && b.isBool()) return a.toBool() == b.toBool();
  return false;
}

}  // namespace

namespace {

// How many leading size-1 dims of `sizes` an assignment into `dim` dims drops.
size_t leading_ones(c10::IntArrayRef sizes, size_t dim) {
  size_t n = 0;
  while (sizes.size() - n > dim && sizes[n] == 1) ++n;
  return n;
}

}  // namespace

at::Tensor strip_leading_ones(const at::Tensor& t, int64_t dim) {
  at::Tensor src = t;
  for (size_t n = leading_ones(t.sizes(), static_cast<size_t>(dim)); n > 0; --n) src = src.squeeze(0);
  return src;
}

std::optional<RowWrite> row_write(const at::Tensor& t, int64_t start, int64_t size, const Arg& index,
                                  const IValue& item) {
  if (!is_number(item) && !item.isTensor()) return std::nullopt;
  // Writes that raise (into a leaf that requires grad, into overlapping memory)
  // go through set_item, which raises the usual error.
  if ((t.is_leaf() && t.requires_grad()) || at::has_internal_overlap(t) != at::MemOverlap::No) return std::nullopt;
  BasicParts parts;
  if (!basic_parts(index, parts) || parts.empty()) return std::nullopt;
  RowWrite w;
  const BasicIndex& first = parts[0];
  if (first.kind == BasicIndex::Kind::Int) {
    if (first.i < -size || first.i >= size) return std::nullopt;
    w.row = start + (first.i < 0 ? first.i + size : first.i);
    w.rows = 1;
    w.row_dim = false;
  } else if (full_slice(first, size)) {
    w.row = start;
    w.rows = size;
  } else {
    return std::nullopt;
  }
  size_t k = 1;
  for (; k < parts.size() && parts[k].kind == BasicIndex::Kind::Int; ++k) {
    const auto d = static_cast<int64_t>(k);
    if (d >= t.dim()) return std::nullopt;
    const int64_t n = t.size(d), i = parts[k].i;
    if (i < -n || i >= n) return std::nullopt;
    w.coords.push_back(i < 0 ? i + n : i);
  }
  for (; k < parts.size(); ++k) {
    const auto d = static_cast<int64_t>(k);
    if (parts[k].kind == BasicIndex::Kind::Ellipsis && k + 1 == parts.size()) break;
    if (d >= t.dim() || !full_slice(parts[k], t.size(d))) return std::nullopt;
  }
  if (item.isTensor()) {
    const at::Tensor& src = item.toTensor();
    if (src.is_alias_of(t)) return std::nullopt;  // it would read rows an earlier write changed
    c10::SmallVector<int64_t, 6> view;
    if (w.row_dim) view.push_back(size);
    const auto rest = t.sizes().slice(1 + w.coords.size());
    view.append(rest.begin(), rest.end());
    if (!at::is_expandable_to(src.sizes().slice(leading_ones(src.sizes(), view.size())), view)) return std::nullopt;
  }
  w.item = item;
  return w;
}

void write_rows(const at::Tensor& t, const std::vector<RowWrite>& writes) {
  if (writes.empty()) return;
  if (writes.size() == 1) {
    const RowWrite& w = writes[0];
    at::Tensor view = w.row_dim ? t.narrow(0, w.row, w.rows) : t.select(0, w.row);
    const int64_t d = w.row_dim ? 1 : 0;
    for (int64_t c : w.coords) view = view.select(d, c);
    write_view(view, w.item);
    return;
  }
  const size_t k = writes[0].coords.size();
  int64_t m = 0;
  for (const auto& w : writes) m += w.rows;
  // Index tensors: one entry per written row, its row and its position in dims 1..k.
  at::Tensor index = at::empty({static_cast<int64_t>(k) + 1, m}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = index.data_ptr<int64_t>();
  for (const auto& w : writes) {
    for (int64_t r = 0; r < w.rows; ++r) {
      p[r] = w.row + r;
      for (size_t c = 0; c < k; ++c) p[static_cast<int64_t>(c + 1) * m + r] = w.coords[c];
    }
    p += w.rows;
  }
  if (!t.device().is_cpu()) index = index.to(t.device());
  c10::List<std::optional<at::Tensor>> indices;
  for (size_t c = 0; c <= k; ++c) indices.push_back(index.select(0, static_cast<int64_t>(c)));

  const auto options = at::TensorOptions().dtype(t.scalar_type()).device(t.device());
  bool one_number = is_number(writes[0].item);
  for (size_t i = 1; one_number && i < writes.size(); ++i) one_number = same_number(writes[i].item, writes[0].item);
  at::Tensor values;
  if (one_number) {
    values = at::scalar_tensor(writes[0].item.toScalar(), options);
  } else {
    // Each write's value broadcast to (its rows, the dims after the coords).
    const auto rest = t.sizes().slice(1 + k);
    std::vector<at::Tensor> pieces;
    pieces.reserve(writes.size());
    for (const auto& w : writes) {
      c10::SmallVector<int64_t, 6> shape{w.rows};
      shape.append(rest.begin(), rest.end());
      at::Tensor piece;
      if (is_number(w.item)) {
        piece = at::scalar_tensor(w.item.toScalar(), options).expand(shape);
      } else {
        const auto view = w.row_dim ? at::IntArrayRef(shape) : rest;
        piece = strip_leading_ones(w.item.toTensor(), static_cast<int64_t>(view.size())).expand(view);
        if (!w.row_dim) piece = piece.unsqueeze(0);
        if (piece.scalar_type() != t.scalar_type() || piece.device() != t.device()) piece = piece.to(options);
      }
      pieces.push_back(std::move(piece));
    }
    values = at::cat(pieces, 0);
  }
  t.index_put_(indices, values);
}

bool set_item(const IValue& value, const Arg& index, const IValue& item) {
  if (value.isTensor()) {
    if (is_number(item) || item.isTensor()) {
      // A basic index: write into the view, as Python's indexing does.
      if (auto view = basic_view(value.toTensor(), index)) {
        write_view(*view, item);
        return true;
      }
    }
    std::vector<at::indexing::TensorIndex> idx;
    if (!tensor_indices(index, idx)) return false;
    at::Tensor t = value.toTensor();
    if (item.isTensor()) t.index_put_(idx, item.toTensor());
    else if (item.isInt() || item.isDouble() || item.isBool()) t.index_put_(idx, item.toScalar());
    else return false;
    return true;
  }
  if (value.isList() && index.kind == Arg::Kind::Const && index.value.isInt()) {
    auto list = value.toList();
    list.set(static_cast<size_t>(wrap_index(index.value.toInt(), list.size())), item);
    return true;
  }
  if (const Record* r = as_record(value)) return set_item(IValue(r->fields), index, item);
  if (value.isGenericDict() && index.kind == Arg::Kind::Const && index.value.isString()) {
    value.toGenericDict().insert_or_assign(index.value, item);
    return true;
  }
  return false;
}

std::optional<IValue> get_attr(const IValue& value, const std::string& name) {
  if (value.isTensor()) {
    const at::Tensor& t = value.toTensor();
    if (name == "shape") return IValue(c10::List<int64_t>(t.sizes().vec()));
    if (name == "T") {
      std::vector<int64_t> dims(static_cast<size_t>(t.dim()));
      for (int64_t i = 0; i < t.dim(); ++i) dims[static_cast<size_t>(i)] = t.dim() - 1 - i;
      return IValue(t.permute(dims));
    }
    if (name == "mT") return IValue(t.transpose(-2, -1));
    if (name == "data") return IValue(t.detach());
    if (name == "dtype") return make_dtype(t.scalar_type());
    if (name == "device") return IValue(t.device());
    if (name == "ndim") return IValue(t.dim());
    if (name == "is_cuda") return IValue(t.is_cuda());
    if (name == "requires_grad") return IValue(t.requires_grad());
    if (name == "grad") return t.grad().defined() ? IValue(t.grad()) : IValue();
    return std::nullopt;
  }
  if (const Record* r = as_record(value)) return get_attr(IValue(r->fields), name);
  if (value.isGenericDict()) {
    auto dict = value.toGenericDict();
    auto it = dict.find(IValue(name));
    if (it != dict.end()) return it->value();
  }
  return std::nullopt;
}

bool is_view_op(Op op, const std::string& name) {
  switch (op) {
    case Op::GetItem:
    case Op::Identity:
      return true;
    case Op::GetAttr:
      // A field of a record (`out.last_hidden_state`) is the same tensor, and so
      // are a tensor's T / mT / data / real / imag; these attributes are not.
      return !(name == "shape" || name == "dtype" || name == "device" || name == "ndim" || name == "is_cuda" ||
               name == "requires_grad" || name == "grad" || name == "grad_fn" || name == "layout" ||
               name == "is_leaf");
    case Op::Call: {
      static const std::unordered_set<std::string> views = {
          "view", "view_as", "reshape", "reshape_as", "narrow", "select", "slice", "transpose", "t",
          "permute", "squeeze", "unsqueeze", "expand", "expand_as", "flatten", "unflatten", "unfold",
          "split", "chunk", "unbind", "detach", "as_strided", "diagonal", "movedim", "swapaxes",
          "swapdims", "contiguous", "alias", "view_as_real", "view_as_complex", "split_with_sizes",
          "tensor_split", "hsplit", "vsplit", "mT", "mH", "adjoint", "unsafe_split", "unsafe_chunk",
          "to",  // `to` returns self when nothing changes
      };
      if (views.count(name)) return true;
      return is_inplace_op(op, name);  // x.add_(1) returns x itself
    }
    default:
      return false;
  }
}

bool is_inplace_op(Op op, const std::string& name) {
  switch (op) {
    case Op::SetItem:
    case Op::Swap:
      return true;
    case Op::Call:
      return name.size() > 1 && name.back() == '_' && name.rfind("__", 0) != 0;
    default:
      return false;
  }
}

}  // namespace fastinterleave

// Python operators with no ATen op of their own.
TORCH_LIBRARY(fastinterleave, m) {
  // `other / self` (Python's __rtruediv__): torch computes self.reciprocal() * other.
  m.def("rtruediv.Scalar(Tensor self, Scalar other) -> Tensor", [](const at::Tensor& self, const at::Scalar& other) {
    return self.reciprocal().mul(other);
  });
  m.def("rtruediv.int(int self, int other) -> float",
        [](int64_t self, int64_t other) { return static_cast<double>(other) / static_cast<double>(self); });
  m.def("rtruediv.float(float self, float other) -> float", [](double self, double other) { return other / self; });
}
