// The op table: recorded calls resolved to ATen/TorchScript operators, and the
// built-in value operations (indexing, index assignment, attributes).
#pragma once

#include <fastinterleave/graph.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace torch::jit {
struct Operator;
}

namespace fastinterleave {

// A dtype as a value. An IValue holds a ScalarType as a bare int, which would
// lose its meaning on the way back to Python; ops taking a ScalarType accept it.
struct DTypeValue : torch::CustomClassHolder {
  explicit DTypeValue(at::ScalarType t) : type(t) {}
  at::ScalarType type;
};
c10::IValue make_dtype(at::ScalarType type);
std::optional<at::ScalarType> as_dtype(const c10::IValue& value);

// A record: named fields plus an opaque type tag (the binding layer keeps the
// Python class there, e.g. a transformers ModelOutput subclass, to rebuild it).
// Indexing and attributes reach its fields; batch slicing recurses into them.
struct Record : torch::CustomClassHolder {
  Record(c10::impl::GenericDict f, c10::intrusive_ptr<torch::CustomClassHolder> t)
      : fields(std::move(f)), type(std::move(t)) {}
  c10::impl::GenericDict fields;
  c10::intrusive_ptr<torch::CustomClassHolder> type;
};
// The type tag of a record made from an op's named returns (`max(dim)` gives
// values, indices): Python rebuilds torch.return_types.<op>.
struct ReturnTypeTag : torch::CustomClassHolder {
  explicit ReturnTypeTag(std::string op) : op(std::move(op)) {}
  std::string op;
};

c10::IValue make_record(c10::impl::GenericDict fields, c10::intrusive_ptr<torch::CustomClassHolder> type);
const Record* as_record(const c10::IValue& value);

// Applies `fn` to every tensor leaf of tuples, lists, dicts and records,
// rebuilding the containers; other values pass through.
c10::IValue map_tensors(const c10::IValue& value, const std::function<c10::IValue(const at::Tensor&)>& fn);

// All registered overloads of `aten::<name>` a recorded call may bind to
// (out= variants excluded), in registration order.
struct OpCandidates {
  std::string name;
  std::vector<std::shared_ptr<torch::jit::Operator>> overloads;
};

// The candidates for `name`, or nullptr when no operator has that name. Cached;
// thread-safe.
const OpCandidates* resolve_op(const std::string& name);

using Kwargs = std::vector<std::pair<std::string, c10::IValue>>;

// Calls the first overload whose schema accepts (args, kwargs) with Python's
// conventions (an int for a float, an int for int[N], trailing ints packed into
// an int[] argument). std::nullopt when no overload accepts them.
std::optional<c10::IValue> call_op(const OpCandidates& op, const std::vector<c10::IValue>& args,
                                   const Kwargs& kwargs);

// Turns a resolved argument tree (no Refs left) into an IValue. Lists of one
// element type become typed lists (int[], float[], Tensor[], bool[]).
// std::nullopt when it holds a Slice or Ellipsis (index syntax, no IValue form).
std::optional<c10::IValue> to_ivalue(const Arg& resolved);

// value[index] for tensors (Python indexing semantics), tuples, lists and
// string-keyed dicts (an int index into a dict picks its i-th entry, like a
// transformers ModelOutput). std::nullopt when the value is not one of these.
std::optional<c10::IValue> get_item(const c10::IValue& value, const Arg& index);

// value[index] = item, in place, for tensors and lists. false when unsupported.
bool set_item(const c10::IValue& value, const Arg& index, const c10::IValue& item);

// A write `value[index] = item` into rows [start, start + size) of a batch tensor
// (an invoke's rows), in a form that writes of other invokes into the same tensor
// join (write_rows): the index takes all the rows (`:`) or one (an int), then one
// position in each of the next dims (ints), then all of the rest (`:`, or a
// trailing `...`); the item is a number or a tensor that broadcasts to the view.
struct RowWrite {
  int64_t row = 0, rows = 0;            // rows [row, row + rows) of the batch tensor
  bool row_dim = true;                  // the view keeps the row dim (the index began with `:`)
  c10::SmallVector<int64_t, 4> coords;  // positions in dims 1..coords.size()
  c10::IValue item;
};
// std::nullopt when the write has another form, or when it would raise or read
// what another write changes (set_item then does it, with the usual errors).
std::optional<RowWrite> row_write(const at::Tensor& batch, int64_t start, int64_t size, const Arg& index,
                                  const c10::IValue& item);
// Does the writes (disjoint rows, as many coords each) with one index_put_; one
// write goes through its view as set_item would.
void write_rows(const at::Tensor& batch, const std::vector<RowWrite>& writes);
// `t` less leading size-1 dims while it has more than `dim` (how a tensor
// assigned through an index broadcasts).
at::Tensor strip_leading_ones(const at::Tensor& t, int64_t dim);

// Tensor attributes (shape, T, mT, data, dtype, device, ndim, grad, ...) and dict
// keys. std::nullopt when unsupported.
std::optional<c10::IValue> get_attr(const c10::IValue& value, const std::string& name);

// Whether the result of calling `name` on a tensor can share its storage (used
// to find which site an in-place edit changes).
bool is_view_op(Op op, const std::string& name);
// Whether the op writes into its first argument.
bool is_inplace_op(Op op, const std::string& name);

}  // namespace fastinterleave
