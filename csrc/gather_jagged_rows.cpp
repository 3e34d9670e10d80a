// msrec::gather_jagged_rows(Tensor[] values, Tensor[] offsets, Tensor idx) -> (Tensor, Tensor)
//
// The shuffled reader's window gather of a list feature (msrec_dist/data/decode.py take_window):
// a shuffle window lies in several decoded row groups, and its rows are wanted in a permuted
// order. `idx` indexes the rows of the parts laid end to end (part 0's rows, then part 1's, ...);
// part p's row r is values[p][offsets[p][r] : offsets[p][r + 1]] (offsets [rows_p + 1] int64,
// absolute into that part's int64 values, so a row group's arrays serve as they are). Returns the
// selected rows' ids in idx's order and their offsets [len(idx) + 1] from 0.
//
// Hand-written because numpy must concatenate the parts and then take four passes with
// temporaries (repeat, arange, add, take), and neither torch nor fbgemm has an int64 jagged gather
// on CPU: this copies each selected row once, 2.2x faster on a 65536-row window of 10-id lists.
// (Fixed-width columns stay with numpy's concatenate + take, which beat a C++ loop over parts.)
// Single-threaded on purpose: the reader runs beside the train step, whose threads hold the cores.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace msrec {
namespace {

// Row starts of the parts laid end to end: starts[p] = first global row of part p, starts.back() = total.
std::vector<int64_t> part_starts(const std::vector<int64_t>& rows) {
  std::vector<int64_t> starts(rows.size() + 1, 0);
  for (size_t p = 0; p < rows.size(); ++p) starts[p + 1] = starts[p] + rows[p];
  return starts;
}

// (part, row within it) of global row g. Branch-free: over a permuted window the part changes
// at random from row to row, and a search that branches on it mispredicts about once a row.
inline std::pair<int64_t, int64_t> locate(const std::vector<int64_t>& starts, int64_t g) {
  const int64_t n_parts = static_cast<int64_t>(starts.size()) - 1;
  int64_t p = 0;
  for (int64_t k = 1; k < n_parts; ++k) p += g >= starts[k];
  return {p, g - starts[p]};
}

void check_idx(const at::Tensor& idx, int64_t total, const char* op) {
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, op, ": idx must be 1-D int64");
  const int64_t* pi = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    TORCH_CHECK(pi[i] >= 0 && pi[i] < total, op, ": idx[", i, "] = ", pi[i], " outside 0..", total - 1);
  }
}

std::tuple<at::Tensor, at::Tensor> gather_jagged_rows_cpu(at::TensorList values, at::TensorList offsets,
                                                          const at::Tensor& idx_in) {
  constexpr const char* op = "msrec::gather_jagged_rows";
  TORCH_CHECK(!values.empty() && values.size() == offsets.size(), op, ": one offsets tensor per values tensor");
  const at::Tensor idx = idx_in.contiguous();
  std::vector<at::Tensor> keep;
  std::vector<const int64_t*> pv, po;
  std::vector<int64_t> rows;
  for (size_t p = 0; p < values.size(); ++p) {
    TORCH_CHECK(values[p].dim() == 1 && offsets[p].dim() == 1 && values[p].scalar_type() == at::kLong &&
                    offsets[p].scalar_type() == at::kLong && offsets[p].numel() >= 1,
                op, ": values and offsets must be 1-D int64, offsets with rows + 1 entries");
    keep.push_back(values[p].contiguous());
    pv.push_back(keep.back().const_data_ptr<int64_t>());
    keep.push_back(offsets[p].contiguous());
    po.push_back(keep.back().const_data_ptr<int64_t>());
    const int64_t n = offsets[p].numel() - 1;
    TORCH_CHECK(po[p][0] >= 0 && po[p][n] <= values[p].numel(), op, ": part ", p, "'s offsets lie outside its values");
    rows.push_back(n);
  }
  const auto starts = part_starts(rows);
  check_idx(idx, starts.back(), op);
  const int64_t m = idx.numel();
  const int64_t* pi = idx.const_data_ptr<int64_t>();
  at::Tensor out_off = at::empty({m + 1}, idx.options());
  int64_t* pn = out_off.mutable_data_ptr<int64_t>();
  pn[0] = 0;
  for (int64_t i = 0; i < m; ++i) {
    const auto [p, r] = locate(starts, pi[i]);
    const int64_t len = po[p][r + 1] - po[p][r];
    TORCH_CHECK(len >= 0, op, ": part ", p, "'s offsets decrease at row ", r);
    pn[i + 1] = pn[i] + len;
  }
  at::Tensor out = at::empty({pn[m]}, idx.options());
  int64_t* pw = out.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) {
    const auto [p, r] = locate(starts, pi[i]);
    const int64_t len = pn[i + 1] - pn[i];
    if (len == 1) {
      pw[pn[i]] = pv[p][po[p][r]];  // the common short row: no memcpy call
    } else if (len > 0) {
      std::memcpy(pw + pn[i], pv[p] + po[p][r], sizeof(int64_t) * len);
    }
  }
  return {out, out_off};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(msrec, m) {
  m.def("gather_jagged_rows(Tensor[] values, Tensor[] offsets, Tensor idx) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(msrec, CPU, m) {
  m.impl("gather_jagged_rows", &gather_jagged_rows_cpu);
}

}  // namespace msrec
